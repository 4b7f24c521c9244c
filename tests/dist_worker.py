"""Run by test_train.py under `accelerate launch --cpu --num_processes 2`: trains a tiny model
and records, per rank, the blocks it saw and a hash of its final weights."""
import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from conftest import TINY_SPLIT, tiny_base, tiny_tokenizer, write_corpus
from ouroboros_lm import save_adapter
from ouroboros_lm import OuroborosConfig, OuroborosModel
from ouroboros_lm.data import build_corpus
from ouroboros_lm.train import TrainConfig, train

out = Path(sys.argv[1])
acc = Accelerator(cpu=not torch.cuda.is_available())
run = out / "run"
text = out / "text"
if acc.is_main_process:
    write_corpus(text, n_docs=12)
acc.wait_for_everyone()
corpus = build_corpus([str(text)], tiny_tokenizer(), seq_len=32, heldout_fraction=0.2)
model = OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**TINY_SPLIT))
before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
if acc.is_main_process:
    save_adapter(model, run)
acc.wait_for_everyone()
seen = []
tc = TrainConfig(steps=4, batch_size=2, lr=1e-2, warmup_steps=1, log_every=1, eval_every=4, eval_blocks=2, save_every=2, progress=False, depths=(1, 2))
train(model, corpus, run, tc, accelerator=acc, on_batch=lambda step, micro, idx: seen.append(idx.tolist()))
h = hashlib.sha256()
changed = False
for k, v in sorted(model.trainable_state_dict().items()):
    h.update(v.detach().cpu().numpy().tobytes())
    changed |= not torch.equal(v.detach().cpu(), before[k])
(out / f"rank{acc.process_index}.json").write_text(json.dumps(
    {"world_size": acc.num_processes, "backend": torch.distributed.get_backend(), "batches": seen, "weights_sha256": h.hexdigest(), "changed": changed}))
