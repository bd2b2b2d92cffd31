"""`llmeasyquant eval --text FILE`: perplexity on the user's own text, the
protocol line naming that text (issue 20's out-of-domain measurements)."""

import math

import torch

from llmeasyquant import cli
from llmeasyquant.eval.perplexity import perplexity, tokenize_file

import tiny_models


def _text(path, seed):
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (400,), generator=g).tolist()))
    return path


def test_eval_text_scores_the_named_file(tmp_path, capsys, one_thread):
    model, tok = tiny_models.build("llama"), tiny_models.byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    a, b = _text(tmp_path / "a.txt", 0), _text(tmp_path / "b.txt", 1)
    want = {p: perplexity(model, ids=tokenize_file(tok, str(p)), seq_len=64, max_windows=2, progress=False).ppl
            for p in (a, b)}
    assert want[a] != want[b]  # else the test could not tell which file was read
    for p in (a, b):
        assert cli.main(["eval", str(tmp_path / "m"), "--ppl", "--text", str(p), "--max-windows", "2",
                         "--seq-len", "64", "--quiet"]) == 0
        out = capsys.readouterr().out
        line = next(s for s in out.splitlines() if "perplexity" in s)
        assert str(p) in line and "2 windows x 64 tokens" in line, line
        assert math.isclose(float(line.split()[1]), want[p], rel_tol=1e-3), (line, want[p])


def test_eval_text_missing_file_is_a_clear_error(tmp_path, capsys):
    model, tok = tiny_models.build("llama"), tiny_models.byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert cli.main(["eval", str(tmp_path / "m"), "--ppl", "--text", str(tmp_path / "nope.txt")]) == 2
    assert "--text: no such file:" in capsys.readouterr().err
