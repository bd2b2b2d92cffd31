"""Every example of the README and every `--help` example runs, so none of
them rots (issue 14: the bench example of its own --help had failed).

The examples run as written, with one substitution: the default model
`smollm2-135m` is replaced by a tiny local LLaMA folder (4 layers, hidden 64,
byte tokenizer), because the real model's runs take minutes each (`make demo`
runs the main one for real). The code blocks run in order, in one namespace,
in a fresh working directory; the shell commands run through the real CLI.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import tiny_models
import llmeasyquant.cli as cli

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = open(os.path.join(ROOT, "README.md")).read()
DEFAULT = "smollm2-135m"
# the examples run in a fresh folder: point them at the real data explicitly
DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))


def _blocks(lang: str) -> list[str]:
    """The fenced code blocks opened with ```LANG (LANG "" = no language)."""
    out, cur, fence_lang = [], None, None
    for line in README.splitlines():
        if line.startswith("```"):
            if cur is None:
                cur, fence_lang = [], line[3:].strip()
            else:
                if fence_lang == lang:
                    out.append("\n".join(cur) + "\n")
                cur = None
        elif cur is not None:
            cur.append(line)
    return out


def _shell_examples() -> list[str]:
    cmds = []
    for block in _blocks("bash") + _blocks(""):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("llmeasyquant ", "torchrun ")):
                cmds.append(line)
    prose = re.sub(r"```.*?```", "", README, flags=re.S).replace("\n", " ")
    for span in re.findall(r"`((?:llmeasyquant|torchrun) [^`]+)`", prose):
        placeholder = any(re.fullmatch(r"[A-Z]{2,}", w) for w in span.split())
        if not placeholder and not any(mark in span for mark in ("[", "|", "...")):  # not a syntax summary
            cmds.append(span)
    return list(dict.fromkeys(" ".join(c.split()) for c in cmds))


def _help_examples() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out = []
    for name, p in sub.choices.items():
        m = re.search(r"example: (.+)", p.epilog or "", flags=re.S)
        assert m, f"`llmeasyquant {name} --help` has no example"
        out.append(" ".join(m.group(1).split()))
    return out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=tiny_models.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_models.byte_tokenizer().save_pretrained(d)
    return str(d)


def test_readme_lists_examples():
    shell = _shell_examples()
    assert any(c.startswith("llmeasyquant compare") for c in shell)
    assert any(c.startswith("torchrun") for c in shell)
    assert any(c.startswith("llmeasyquant export") for c in shell)
    assert len(_blocks("python")) >= 5


def test_python_examples(tiny_folder, tmp_path, monkeypatch):
    import llmeasyquant.models as models

    real = models.load_model
    monkeypatch.setattr(models, "load_model",
                        lambda name=DEFAULT, *a, **k: real(tiny_folder if name == DEFAULT else name, *a, **k))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMEQ_DATA_DIR", os.environ.get("LLMEQ_DATA_DIR", DATA))
    ns: dict = {}
    for i, code in enumerate(_blocks("python")):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)
        except Exception as err:
            raise AssertionError(f"README python block {i + 1} fails:\n{code}") from err
    assert os.path.isfile(tmp_path / "smollm2-sq" / "quantization.json")
    assert os.path.isfile(tmp_path / "smollm2-sq.onnx")


def _run(cmd: str, tiny_folder: str, cwd) -> None:
    argv = [tiny_folder if a == DEFAULT else a for a in shlex.split(cmd)]
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    else:
        argv = [sys.executable, "-m", "llmeasyquant.cli", *argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", LLMEQ_DATA_DIR=os.environ.get("LLMEQ_DATA_DIR", DATA))
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"`{cmd}` failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def _outputs(cmd: str) -> set[str]:
    """The paths a command writes (its ``--out`` / ``--onnx`` values)."""
    argv = shlex.split(cmd)
    return {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "--onnx")}


def _dependencies(cmds: list[str]) -> list[set[int]]:
    """For each command, the earlier ones it must wait for: those that write a
    path it reads or writes (a token of it that is, or lies under, an earlier
    command's output)."""
    deps = []
    for j, cmd in enumerate(cmds):
        tokens = shlex.split(cmd)
        deps.append({i for i in range(j) for out in _outputs(cmds[i])
                     if any(t == out or t.startswith(out + "/") for t in tokens)})
    return deps


def test_dependencies_of_the_examples():
    cmds = ["llmeasyquant quantize m --out a", "llmeasyquant export a --onnx a.onnx", "llmeasyquant info",
            "llmeasyquant compare m --out r", "llmeasyquant compare m --out r", "llmeasyquant eval a --ppl"]
    assert _dependencies(cmds) == [set(), {0}, set(), set(), {3}, {0}]


def test_shell_and_help_examples(tiny_folder, tmp_path):
    """The README's commands, then each --help example not already among them
    (the same command is run once). A command starts once every earlier one
    that writes a path it uses has finished (the README's order for those);
    the others run two at a time: each is one single-threaded process, mostly
    interpreter start-up and imports."""
    import time
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    awq = "llmeasyquant quantize smollm2-135m --method awq --w-bits 4 --w-group-size 64 --out smollm2-awq"
    cmds = list(dict.fromkeys(_shell_examples() + _help_examples()))
    assert awq in cmds and cmds.index(awq) < min(i for i, c in enumerate(cmds) if "smollm2-awq --" in c)
    deps, done, running = _dependencies(cmds), set(), {}

    def timed(i):
        t0 = time.perf_counter()
        _run(cmds[i], tiny_folder, tmp_path)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=2) as pool:
        while len(done) < len(cmds):
            for i in range(len(cmds)):
                if i not in done and i not in running.values() and deps[i] <= done and len(running) < 2:
                    running[pool.submit(timed, i)] = i
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = running.pop(fut)
                print(f"{fut.result():6.1f} s  {cmds[i]}")  # re-raises a failed command's assertion
                done.add(i)
