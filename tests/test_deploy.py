"""What the heal models buy where they are deployed (`ouroboros_recipes.deploy.measure_folders`, used by the
demo, the frontier and bench/deploy_speed.py): plain folders measured together in stock transformers, each row's
layers, size and ideal speed-up against the full model from an independent count of the folders' own weights."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM

from conftest import TINY, save_tiny_base
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model
from ouroboros_lm.adapter import save_adapter
from ouroboros_lm.export import export_plain
from ouroboros_recipes.deploy import measure_folders


def weights_read_per_token(folder) -> int:
    """Every weight matrix of the layers (norm vectors aside) plus the head (tied or not): what one token's forward
    reads, the embedding row being a lookup."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    layers = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    return layers + model.lm_head.weight.numel()


def test_plain_folders_are_measured_against_the_full_model(tmp_path, one_thread):
    base = save_tiny_base(tmp_path / "base")
    keep = (0, 1, 4, 6, 7)
    model = OuroborosModel.from_base(load_base_model(base), OuroborosConfig(n_prelude=2, recurrent_layer=4, n_coda=2,
                                     keep_layers=keep, heal_layers=1, lora_rank=2), base_name=base)
    save_adapter(model, tmp_path / "heal")
    plain = export_plain(tmp_path / "heal", tmp_path / "plain")
    ids = list(range(10, 26))
    rows = measure_folders({"full": base, "cut": str(plain)}, ids, new_tokens=3, rounds=2)
    full, cut = rows["full"], rows["cut"]
    assert (full["layers"], cut["layers"]) == (TINY["num_hidden_layers"], len(keep))
    assert full["decode_x"] == full["prompt_x"] == full["ideal_x"] == full["size_x"] == 1.0
    assert cut["ideal_x"] == weights_read_per_token(base) / weights_read_per_token(plain)
    size = sum(f.stat().st_size for f in Path(plain).glob("*.safetensors"))  # the weights, not the tokenizer
    assert cut["disk_bytes"] == size and cut["size_x"] == size / full["disk_bytes"]
    assert cut["runtime"] == "transformers" and cut["class"] == "LlamaForCausalLM"
    assert len(cut["decode_rounds"]) == 2 and all(t > 0 for t in cut["decode_rounds"])
    assert cut["peak_rss_bytes"] is None and cut["peak_x"] is None  # peak memory only when asked (a process each)
