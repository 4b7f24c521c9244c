"""The converters behind `make domains`: what they keep and what they drop."""
import json

import pytest

from ouroboros_recipes.corpora import convert_email, convert_python_docs, email_body, main, rst_to_text


def test_rst_roles_literals_and_links_become_their_text():
    rst = ("Use :func:`len` or :meth:`~str.join` and ``x + 1``; see :ref:`the tutorial <tut-intro>`,\n"
           "`Python <https://python.org>`_ and :py:class:`!Foo`.\n\n.. note::\n\n   Kept as written.\n")
    assert rst_to_text(rst) == ("Use len or str.join and x + 1; see the tutorial,\nPython and Foo.\n\n"
                                ".. note::\n\n   Kept as written.\n")


def test_email_body_drops_the_headers_and_keeps_the_body():
    msg = "From: a@b\nSubject: hi\nReceived: by x\n\tfolded line\n\nDear list,\n\nthe body.\n"
    assert email_body(msg) == "Dear list,\n\nthe body.\n"
    assert email_body("From: a@b\nSubject: headers only") == ""


def test_email_conversion_skips_messages_with_nothing_to_say(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    long_body = " ".join(f"word{i}" for i in range(30))
    (src / "00001.abc.json").write_text(json.dumps({"text": f"From: a\n\n{long_body}"}))
    (src / "00002.def.json").write_text(json.dumps({"text": "From: a\n\nthanks!"}))
    assert convert_email(src, out) == 1
    assert [p.name for p in out.iterdir()] == ["00001.txt"]
    assert (out / "00001.txt").read_text() == long_body + "\n"


def test_python_docs_keep_one_document_per_page_and_refuse_a_missing_section(tmp_path):
    src, out = tmp_path / "_sources", tmp_path / "out"
    (src / "tutorial").mkdir(parents=True), out.mkdir()
    (src / "tutorial" / "intro.rst.txt").write_text("Call :func:`print`.\n")
    assert convert_python_docs(src, out, ("tutorial",)) == 1
    assert (out / "tutorial_intro.txt").read_text() == "Call print.\n"
    refused = tmp_path / "refused"
    refused.mkdir()
    with pytest.raises(FileNotFoundError, match="howto"):
        convert_python_docs(src, refused, ("tutorial", "howto"))
    assert list(refused.iterdir()) == []  # nothing written before the refusal


def test_cli_refuses_an_existing_output_folder(tmp_path):
    (tmp_path / "src").mkdir(), (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("nothing already saved is lost")
    with pytest.raises(SystemExit):
        main(["moby-dick", str(tmp_path / "src"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "kept.txt").read_text() == "nothing already saved is lost"
