"""Reliability (issue 6): atomic checkpoints, exact resume after kill -9 (torchrun, 2 processes),
non-finite guards, validated inputs (fuzzed loaders), safe loading, dead ranks, output safety.

Faults are injected through monkeypatching and the trainer's documented test hooks
(``OREO_FAULT_EXIT_AT_STEP``, ``OREO_FAULT_STEP_DELAY_S``, see oreo_fast.train.guard)."""
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oreo_fast.train import checkpoint, export, guard
from oreo_fast.errors import ConfigError
from oreo_fast.train.config import TrainConfig, load_train_config
from oreo_fast.train.data import read_training_examples
from oreo_fast.errors import CheckpointError, ModelDirError, NonFiniteError, OutputError
from oreo_fast.errors import DataError
from oreo_fast.io import atomic_dir, read_jsonl, write_jsonl
from oreo_fast.models import TinyModelConfig, ValueModel, build_tiny_model, load_policy, save_model
from oreo_fast.tasks.problems import load_problems
from oreo_fast.tokenizer import build_tokenizer
from oreo_fast.train.trainer import Trainer
from processes import run_process_group
from test_train import _config, _free_port, tiny  # noqa: F401  (the tiny fixture)

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# ------------------------------------------------------------------ fuzzed loaders

# text sometimes with lone surrogates, numbers sometimes beyond float range
texts = st.text() | st.text(st.characters() | st.sampled_from(["\ud800", "\udcff"]), max_size=8)
numbers = st.integers() | st.floats() | st.sampled_from([10**400, -10**400, 2**63, 1e308])
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
# records that get past the first checks so the field checks are exercised
trajectory_like = st.fixed_dictionaries(
    {"prompt": json_values | texts, "reward": json_values | numbers},
    optional={"response": json_values | texts,
              "turns": json_values | st.lists(st.fixed_dictionaries(
                  {"role": st.sampled_from(["assistant", "user"]) | json_values,
                   "content": texts | json_values}), max_size=3)})
problem_like = st.fixed_dictionaries({}, optional={
    "question": texts | json_values, "answer": texts | json_values,
    "problem": texts | json_values, "solution": texts | json_values,
    "id": json_values})


def _dump(value) -> str:
    return json.dumps(value, allow_nan=True)


@pytest.fixture(scope="module")
def fuzz_tok(tiny):  # noqa: F811
    return tiny[1]


def _only_data_errors(fn, path):
    try:
        fn(path)
    except DataError as e:
        assert str(path) in str(e)  # every error names the file


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_raise_only_data_error(tmp_path, fuzz_tok, data):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(data)
    _only_data_errors(lambda p: list(read_jsonl(p)), path)
    _only_data_errors(lambda p: read_training_examples(p, fuzz_tok, 64), path)
    _only_data_errors(load_problems, path)


@FUZZ
@given(lines=st.lists(json_values | trajectory_like | problem_like, min_size=1, max_size=4))
def test_fuzz_arbitrary_json_raises_only_data_error(tmp_path, fuzz_tok, lines):
    path = tmp_path / "json.jsonl"
    path.write_text("".join(_dump(v) + "\n" for v in lines), encoding="utf-8")
    _only_data_errors(lambda p: list(read_jsonl(p)), path)
    _only_data_errors(lambda p: read_training_examples(p, fuzz_tok, 64), path)
    _only_data_errors(load_problems, path)


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(sorted(TrainConfig.__dataclass_fields__)),
                           json_values, max_size=6))
def test_fuzz_configs_raise_only_config_error(tmp_path, raw):
    path = tmp_path / "config.json"
    path.write_text(_dump({"policy": "p", "train_file": "t", **raw}))
    try:
        load_train_config(path)
    except ConfigError:
        pass


@pytest.mark.parametrize("content,match", [
    (b'{"prompt": "a", "response": "b", "reward": 1}\n\xff\xfe{"x"}\n', r":2: not valid UTF-8"),
    (b'{"prompt": "a", "response": "b", "reward": 1}\n' + b"[" * 100000 + b"\n",
     r":2: malformed JSON"),
    (b'{"prompt": "a", "response": "b", "reward": 1' + b"1" * 5000 + b"}\n",
     r":1: malformed JSON"),
    (b'{"prompt": "a", "response": "b", "reward": 1' + b"0" * 400 + b"}\n",
     r":1: field 'reward': reward must be finite"),
    (b'{"prompt": "a", "response": "\\ud800", "reward": 1}\n',
     r":1: field 'response': not valid Unicode"),
    (b'{"prompt": 3, "response": "b", "reward": 1}\n', r":1: field 'prompt': expected str"),
    (b'{"prompt": "a", "response": "b", "reward": "1"}\n', r":1: field 'reward': expected"),
])
def test_bad_trajectory_bytes_name_file_line_and_field(tmp_path, fuzz_tok, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"bad\.jsonl" + match):
        read_training_examples(path, fuzz_tok, 64)


@pytest.mark.parametrize("line,match", [
    ('{"question": "q"}', r":1: field 'answer': missing"),
    ('{"question": "q", "answer": "no marker"}', r":1: field 'answer': no final answer"),
    ('{"problem": "p", "solution": "no box"}', r":1: field 'solution': no final answer"),
    ('{"id": [1], "question": "q", "answer": "#### 1"}', r":1: field 'id'"),
    ('{"text": "neither"}', r":1: field 'question'"),
])
def test_bad_problem_lines_name_file_line_and_field(tmp_path, line, match):
    path = tmp_path / "problems.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=r"problems\.jsonl" + match):
        load_problems(path)


@pytest.mark.parametrize("override,match", [
    ("max_bad_steps=0", "max_bad_steps: must be >= 1"),
    ("collective_timeout_s=-1", "collective_timeout_s: must be a finite number > 0"),
    ("collective_timeout_s=inf", "collective_timeout_s: must be a finite number > 0"),
    ("max_steps=1e999", "max_steps: expected an integer"),
    ("keep_checkpoints=0", "keep_checkpoints: must be >= 1"),
    ("warmup_ratio=1.5", "warmup_ratio: must be in"),
    ("policy_lr=nan", "policy_lr: must be > 0"),
    ("resume=maybe", "resume: expected true or false"),
])
def test_out_of_range_config_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, ["policy=p", "train_file=t", override])


# ------------------------------------------------------------------ model folders, safe loading


def test_model_folders_are_checked_before_loading(tiny, tmp_path):  # noqa: F811
    root, _, _ = tiny
    with pytest.raises(ModelDirError, match=r"nowhere: policy folder does not exist"):
        Trainer(_config(root, policy=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "o")))
    no_config = tmp_path / "no_config"
    shutil.copytree(root / "ref", no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ModelDirError, match=r"no_config: reference folder has no config\.json"):
        Trainer(_config(root, reference=str(no_config), output_dir=str(tmp_path / "o")))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(root / "ref", no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"no_weights: value folder has no weights"):
        Trainer(_config(root, value=str(no_weights), output_dir=str(tmp_path / "o")))
    pickled = tmp_path / "pickled"
    shutil.copytree(root / "ref", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match=r"pickled: model weights are pickled "
                                            r"\(pytorch_model\.bin\); .* only from safetensors"):
        load_policy(pickled)
    bad_json = tmp_path / "bad_json"
    shutil.copytree(root / "ref", bad_json)
    (bad_json / "config.json").write_text("{oops")
    with pytest.raises(ModelDirError, match=r"bad_json: model config\.json is not valid JSON"):
        load_policy(bad_json)


def test_vocabulary_and_tokenizer_mismatch_name_both_folders(tiny, tmp_path):  # noqa: F811
    root, _, records = tiny
    texts = [r["prompt"] + r["response"] for r in records]
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1)
    small = build_tokenizer(texts, vocab_size=280)
    save_model(build_tiny_model(small, TinyModelConfig(**size)), small, tmp_path / "small")
    with pytest.raises(ModelDirError, match=r"vocabulary mismatch: reference model \S*small has "
                                            r"\d+ tokens, policy model \S*policy has \d+"):
        Trainer(_config(root, reference=str(tmp_path / "small"), output_dir=str(tmp_path / "o")))
    # the same vocabulary size, other merges: a different tokenizer
    other = build_tokenizer([t.upper() + " zebra quokka" for t in texts], vocab_size=300)
    assert len(other) == len(tiny[1]) and other.get_vocab() != tiny[1].get_vocab()
    shutil.copytree(root / "ref", tmp_path / "other_tok")
    other.save_pretrained(str(tmp_path / "other_tok"))
    with pytest.raises(ModelDirError, match=r"tokenizer mismatch \(vocabulary\): reference folder "
                                            r"\S*other_tok and policy folder \S*policy"):
        Trainer(_config(root, reference=str(tmp_path / "other_tok"),
                        output_dir=str(tmp_path / "o")))


def test_no_pickle_anywhere_and_remote_code_off_by_default():
    sources = {p: p.read_text() for p in (REPO / "oreo_fast").rglob("*.py")}
    for path, text in sources.items():
        assert not re.search(r"^\s*import pickle|^\s*from pickle|\bdill\b", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "trust_remote_code=True" not in text, path
    from dataclasses import fields, is_dataclass

    import oreo_fast.train.config as config_module
    for module in (config_module,):
        for obj in vars(module).values():
            if is_dataclass(obj) and "trust_remote_code" in obj.__dataclass_fields__:
                assert {f.name: f.default for f in fields(obj)}["trust_remote_code"] is False


# ------------------------------------------------------------------ atomic writes, output safety


def test_atomic_dir_fsyncs_every_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
        tmp_name = tmp.name
    names = {Path(p).name for p in synced}
    assert {"a.txt", "b.txt", "sub", tmp_name, tmp_path.name} <= names
    assert (tmp_path / "out" / "sub" / "b.txt").read_text() == "b"


def test_full_disk_while_writing_leaves_the_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_jsonl(path, rows())
    assert path.read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no temporary left


def test_unwritable_or_full_output_is_reported_before_training(tiny, tmp_path, monkeypatch):  # noqa: F811
    root, _, _ = tiny
    blocker = tmp_path / "file"
    blocker.write_text("x")
    loaded = []
    monkeypatch.setattr("oreo_fast.train.step.load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(OutputError, match=r"file/run: cannot create the output folder"):
        Trainer(_config(root, output_dir=str(blocker / "run")))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OutputError, match=r"full: only 0\.0 MiB free; .* need about"):
        Trainer(_config(root, output_dir=str(tmp_path / "full"), save_every=1))
    assert loaded == []  # reported before any model was loaded
    assert list((tmp_path / "full").iterdir()) == []  # the probe file is gone


def test_failed_final_save_leaves_no_partial_model(tiny, tmp_path, monkeypatch):  # noqa: F811
    """The value folder fails (ENOSPC) after the policy folder was written: neither appears,
    because the pair is committed together."""
    root, _, _ = tiny

    def fail(root_module, tokenizer, out, dtype, **_):
        if out is not None:
            (out / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_value", fail)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        Trainer(_config(root, output_dir=str(out), max_steps=1)).fit()
    assert not (out / "policy").exists() and not (out / "value").exists()
    assert list((out / "exports").iterdir()) == []  # the temporary folder is gone


def test_a_failed_export_keeps_the_previous_pair(tiny, tmp_path, monkeypatch):  # noqa: F811
    """export_every=1: the export of step 3 fails half-way; policy/ and value/ both still
    show step 2 (one pair, never a mix), and they load."""
    root, _, _ = tiny
    real = export.write_value
    out = tmp_path / "run"
    trainer = Trainer(_config(root, output_dir=str(out), epochs=2, export_every=1))
    snapshots = {}

    def fail_at_3(root_module, tokenizer, folder, dtype, **kw):
        if trainer.progress.step == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(root_module, tokenizer, folder, dtype, **kw)

    monkeypatch.setattr(export, "write_value", fail_at_3)
    monkeypatch.setattr(guard, "inject", lambda step, rank: snapshots.update(
        {step: {k: v.detach().clone() for k, v in trainer.algorithm.value.state_dict().items()}}))
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    assert os.readlink(out / "current") == "exports/step-2"
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["step-2"]
    value = ValueModel.from_pretrained(out / "value").state_dict()
    for k, v in value.items():
        assert torch.equal(v, snapshots[2]["value_model." + k]), k
    policy = load_policy(out / "policy").state_dict()
    assert (out / "policy").resolve().parent == (out / "value").resolve().parent
    assert set(policy) and json.loads((out / "value" / "config.json").read_text())[
        "oreo_value_model"]["head"] == "value_head.safetensors"


# ------------------------------------------------------------------ checkpoints, non-finite values


def test_crash_mid_checkpoint_keeps_the_previous_one_loadable(tiny, tmp_path, monkeypatch,
                                                              caplog):  # noqa: F811
    """A crash after the shards of step-2 were written but before its manifest: resume
    ignores step-2 (and says so), continues from step-1, and the next save removes it."""
    root, _, _ = tiny
    real = checkpoint.write_json
    out = tmp_path / "run"

    def crash_at_step_2(path, obj):
        if obj.get("step") == 2:
            raise KeyboardInterrupt("killed mid-save")  # the shards are on disk, no manifest
        real(path, obj)

    monkeypatch.setattr(checkpoint, "write_json", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(root, epochs=2, output_dir=str(out), save_every=1)).fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert (out / "checkpoints" / "step-2" / "__0_0.distcp").is_file()
    monkeypatch.setattr(checkpoint, "write_json", real)
    resumed = Trainer(_config(root, epochs=2, output_dir=str(out), resume=True, save_every=1,
                              keep_checkpoints=1))
    assert re.search(r"step-2: no manifest\.json \(a save cut short\); ignored", caplog.text)
    assert resumed.progress.step == 1 and resumed.checkpointer.resume_from.name == "step-1"
    assert resumed.fit()["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4"]


def test_a_damaged_checkpoint_is_refused_naming_file_and_field(tiny, tmp_path):  # noqa: F811
    root, _, _ = tiny
    out = tmp_path / "run"
    Trainer(_config(root, output_dir=str(out), save_every=1, max_steps=1)).fit()
    shard = out / "checkpoints" / "step-1" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated after the manifest was written
    with pytest.raises(CheckpointError, match=r"step-1/manifest\.json: field 'files': "
                                              r"__0_0\.distcp is 100 bytes, expected \d+"):
        Trainer(_config(root, output_dir=str(out), resume=True))
    manifest = out / "checkpoints" / "step-1" / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                    if k != "progress"}))
    with pytest.raises(CheckpointError, match=r"manifest\.json: field 'progress': missing"):
        Trainer(_config(root, output_dir=str(out), resume=True))


def test_pruning_never_deletes_the_only_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((1, True), (2, False), (3, False)):
        (root / f"step-{step}").mkdir(parents=True)
        if complete:
            (root / f"step-{step}" / "manifest.json").write_text("{}")
    (root / ".step-0.deleting").mkdir()  # a leftover of an earlier crash
    checkpoint.prune_checkpoints(root, keep=1, current=root / "step-3")  # step-3 in flight
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-3"]
    (root / "step-3" / "manifest.json").write_text("{}")
    checkpoint.prune_checkpoints(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-3"]


def _nan_loss_at(trainer, bad_steps):
    """Make the loss NaN on the given (1-based) optimizer steps: the trainer's algorithm step
    wrapped, its public interface unchanged."""
    real = trainer.algorithm

    class NanAt:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, batch, num_sequences):
            loss, metrics = real(batch, num_sequences)
            if trainer.progress.step + 1 in bad_steps:
                loss = loss * float("nan")
                metrics = {**metrics, "loss": metrics["loss"] * float("nan")}
            return loss, metrics

    trainer.algorithm = NanAt()


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.algorithm.policy.state_dict().items()}


def test_a_nan_step_is_skipped_and_counted(tiny, tmp_path, monkeypatch):  # noqa: F811
    root, _, _ = tiny
    trainer = Trainer(_config(root, epochs=2, output_dir=str(tmp_path / "run"), save_every=2))
    _nan_loss_at(trainer, {2})
    snapshots = {}
    monkeypatch.setattr(guard, "inject", lambda step, rank: snapshots.update({step: _params(trainer)}))
    trainer.fit()
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert math.isnan(rows[1]["loss"]) and math.isnan(rows[1]["policy_grad_norm"])
    for k in snapshots[1]:  # the skipped step changed nothing ...
        assert torch.equal(snapshots[1][k], snapshots[2][k]), k
    assert any(not torch.equal(snapshots[2][k], snapshots[3][k]) for k in snapshots[2])  # ... the next did
    folder = tmp_path / "run" / "checkpoints" / "step-2"
    assert json.loads((folder / "manifest.json").read_text())["progress"]["skipped_steps"] == 1
    tensors = checkpoint.read_checkpoint_tensors(folder)
    assert any(k.startswith("value_optimizer.") for k in tensors)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_consecutive_nan_steps_stop_training_clearly(tiny, tmp_path, monkeypatch):  # noqa: F811
    root, _, _ = tiny
    out = tmp_path / "run"
    trainer = Trainer(_config(root, epochs=2, output_dir=str(out), max_bad_steps=2))
    _nan_loss_at(trainer, {2, 3, 4})
    with pytest.raises(NonFiniteError, match=r"stopping at step 3: 2 consecutive steps had a "
                                             r"non-finite loss or gradient \(max_bad_steps=2\)"):
        trainer.fit()
    assert not (out / "policy").exists()


def test_a_nan_parameter_is_never_checkpointed(tiny, tmp_path, monkeypatch):  # noqa: F811
    root, _, _ = tiny
    out = tmp_path / "run"
    trainer = Trainer(_config(root, epochs=2, output_dir=str(out), save_every=1))

    def poison(step, rank):
        if step == 1:
            with torch.no_grad():
                next(trainer.algorithm.value.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(guard, "inject", poison)
    with pytest.raises(NonFiniteError, match=r"step 2: .* NaN/Inf values; checkpoint step-2 not "
                                             r"written"):
        trainer.fit()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    with pytest.raises(NonFiniteError, match="not written"):
        trainer.export(tmp_path / "final")
    assert not (tmp_path / "final").exists()


def test_cli_reports_bad_input_in_one_line(tiny, tmp_path, capsys):  # noqa: F811
    from oreo_fast.train.trainer import main

    root, _, _ = tiny
    with pytest.raises(SystemExit) as exit_:
        main([f"policy={root / 'policy'}", f"train_file={tmp_path / 'missing.jsonl'}",
              f"output_dir={tmp_path / 'o'}", "progress=false"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert re.search(r"error: \S*missing\.jsonl: no such file", err)
    with pytest.raises(SystemExit) as exit_:
        main(["policy=p", "train_file=t", "max_bad_steps=-3"])
    assert exit_.value.code == 2 and "max_bad_steps: must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------ torchrun: kill -9, dead ranks


def _torchrun(root, out, *extra, nproc=2):
    args = dict(policy=root / "policy", reference=root / "ref", train_file=root / "traj.jsonl",
                global_batch_size=8, micro_batch_size=3, policy_lr=1e-3, value_lr=1e-3, beta=0.1,
                kl_coef=0.05, progress="false", epochs=3, threads=1, output_dir=out)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", "-m", "oreo_fast.train",
            *[f"{k}={v}" for k, v in args.items()], *extra]


def _processes_with(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (zombies have none)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in command:
                pids.append(int(entry))
    return pids


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OREO_FAULT_")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               **extra)
    return env


def _outputs(out):
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    return rows, load_policy(out / "policy").state_dict(), \
        ValueModel.from_pretrained(out / "value").state_dict()


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):  # noqa: F811
    """An uninterrupted 2-process run (6 steps) to compare against."""
    root, out = tiny[0], tmp_path_factory.mktemp("full") / "run"
    full = run_process_group(_torchrun(root, out), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    return _outputs(out)


def _assert_same_run(expected, out):
    (rows_a, pol_a, val_a), (rows_b, pol_b, val_b) = expected, _outputs(out)
    keys = ("step", "loss", "value_loss", "policy_loss", "kl", "policy_grad_norm",
            "value_grad_norm", "policy_lr", "tokens", "skipped")
    assert len(rows_a) == 6
    assert [[r[k] for k in keys] for r in rows_b] == [[r[k] for k in keys] for r in rows_a]
    for a, b in ((pol_a, pol_b), (val_a, val_b)):
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_is_bit_exact(tiny, full_run, tmp_path):  # noqa: F811
    root, _, _ = tiny
    kill_after = random.randint(1, 4)  # of 6 steps; a checkpoint after every step
    print(f"kill -9 after checkpoint step-{kill_after} exists")
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(root, out, "save_every=1", "keep_checkpoints=2"),
                            env=_env(OREO_FAULT_STEP_DELAY_S="0.4"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not (out / "checkpoints" / f"step-{kill_after}").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline
            time.sleep(0.02)
        time.sleep(random.uniform(0, 0.5))  # anywhere in the next step or save
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher (its workers: below)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # torchrun starts its workers in sessions of their own, so the group kill reaches only
    # the launcher: its workers must end by themselves, not train on (and save, and prune
    # checkpoints) next to the resumed run
    deadline = time.time() + 10
    while _processes_with(f"output_dir={out}") and time.time() < deadline:
        time.sleep(0.05)
    assert not _processes_with(f"output_dir={out}"), "workers outlived their launcher"
    assert not (out / "policy").exists() and not (out / "metrics.jsonl").exists()
    resumed = run_process_group(_torchrun(root, out, "save_every=1", "keep_checkpoints=2",
                                       "resume=true"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(full_run, out)
    assert any(not torch.equal(full_run[1][k], v)
               for k, v in load_policy(root / "policy").state_dict().items())


@pytest.mark.slow
def test_elastic_restart_resumes_exactly(tiny, full_run, tmp_path):  # noqa: F811
    """torchrun --max-restarts=1 and resume=true: rank 1 dies after step 3, torchrun restarts
    the group, which continues from checkpoint step-3 to the same result as no failure."""
    root, _, _ = tiny
    out = tmp_path / "elastic"
    cmd = _torchrun(root, out, "save_every=1", "resume=true")
    cmd.insert(3, "--max-restarts=1")
    proc = run_process_group(cmd, env=_env(OREO_FAULT_EXIT_AT_STEP="1:3"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 fails after step 3 (injected fault)" in proc.stderr  # it did fail once
    _assert_same_run(full_run, out)


_RESTART_WORKER = """
import datetime, os, sys, time
import torch.distributed as dist
from oreo_fast.train.distributed import init_process_group_per_attempt
rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
flag = sys.argv[2] + f".{attempt}"
if rank == 0:
    open(flag, "w").close()
elif attempt == 1:  # rank 0 of the new attempt reaches the store first, however loaded the machine
    while not os.path.exists(flag):
        time.sleep(0.01)
    time.sleep(3)
timeout = datetime.timedelta(seconds=30)
if sys.argv[1] == "plain":
    dist.init_process_group("gloo", timeout=timeout)
else:
    init_process_group_per_attempt("gloo", timeout)
dist.barrier()
if attempt == 0 and rank == 1:
    os._exit(3)  # dies after the group was built: its address stays in the store
dist.barrier()
print(f"attempt {attempt} rank {rank} joined", file=sys.stderr, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_restarted_group_never_reads_the_previous_attempts_addresses(tmp_path):
    """torchrun keeps its store across restarts. With plain ``init_process_group`` rank 0 of
    the new attempt can read the dead rank's old gloo address and fail with "Connection
    refused" (the worker's ``plain`` mode shows it, though not on every run: it is a race);
    our per-attempt init must join every time."""
    script = tmp_path / "worker.py"
    script.write_text(_RESTART_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--max-restarts=1", f"--master_port={_free_port()}", str(script), "per_attempt",
           str(tmp_path / "rank0_started")]
    proc = run_process_group(cmd, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attempt 1 rank 0 joined" in proc.stderr and "attempt 1 rank 1 joined" in proc.stderr


@pytest.mark.slow
def test_a_dead_rank_fails_the_run_within_a_bounded_time(tiny, tmp_path):  # noqa: F811
    root, _, _ = tiny
    bound = 30
    start = time.time()
    proc = run_process_group(_torchrun(root, tmp_path / "dead", f"collective_timeout_s={bound}"),
                          env=_env(OREO_FAULT_EXIT_AT_STEP="1:2"), capture_output=True, text=True,
                          timeout=5 * bound + 60)
    elapsed = time.time() - start
    print(f"torchrun exited {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode != 0
    assert "rank 1 fails after step 2 (injected fault)" in proc.stderr
    assert elapsed < bound + 60, elapsed  # start-up + the bounded wait, not a hang
    assert not (tmp_path / "dead" / "policy").exists()


@pytest.mark.slow
def test_a_stuck_rank_fails_the_run_after_the_collective_timeout(tiny, tmp_path):  # noqa: F811
    root, _, _ = tiny
    bound = 6
    start = time.time()
    proc = run_process_group(_torchrun(root, tmp_path / "stuck", f"collective_timeout_s={bound}"),
                          env=_env(OREO_FAULT_HANG_AT_STEP="1:2"), capture_output=True, text=True,
                          timeout=120)
    elapsed = time.time() - start
    print(f"torchrun exited {proc.returncode} after {elapsed:.1f} s")
    assert "rank 1 hangs after step 2 (injected fault)" in proc.stdout
    assert proc.returncode != 0
    assert elapsed < bound + 45, elapsed  # start-up + the timeout, not a hang
