"""The config contract: every job's config validates on construction and raises one
ConfigError naming the key; flags come from the fields (types from the annotations, help from
the comment beside each field)."""
import argparse
import dataclasses
import importlib
import pkgutil

import pytest

import oreo_fast
from oreo_fast.config import add_config_flags, config_from_args, field_docs, load_config
from oreo_fast.errors import ConfigError
from oreo_fast.models import TinyModelConfig
from oreo_fast.pipeline.demo import DemoConfig
from oreo_fast.pipeline.embedded import EmbeddedConfig
from oreo_fast.pipeline.evaluate import EvalConfig
from oreo_fast.pipeline.iterate import IterateConfig
from oreo_fast.pipeline.sample import SampleConfig
from oreo_fast.pipeline.sft import SFTConfig
from oreo_fast.sampling import SamplingConfig
from oreo_fast.search.beam import SearchConfig
from oreo_fast.tasks.arithmetic import ArithmeticConfig
from oreo_fast.train.config import TrainConfig

FILES = dict(model="m", problems="p", out="o")
# (config, the fields it needs, a bad field, its bad value)
BAD = [
    (TrainConfig, dict(policy="p", train_file="t"), "micro_batch_size", 0),
    (TrainConfig, dict(policy="p", train_file="t"), "level", "sentence"),
    (TrainConfig, dict(policy="p", train_file="t"), "policy", ""),
    (TrainConfig, dict(policy="p", train_file="t", lora="policy"), "lora_rank", 0),
    (SFTConfig, dict(model="m", train="t", out="o"), "lr", 0.0),
    (SFTConfig, dict(model="m", train="t", out="o"), "batch_size", 0),
    (SampleConfig, FILES, "temperature", -1.0),
    (SampleConfig, FILES, "k", 0),
    (EvalConfig, FILES, "top_p", 0.0),
    (EvalConfig, FILES, "kv_sharing", "paged"),
    (EvalConfig, dict(FILES, value="v", beams=2), "candidates", 0),
    (EvalConfig, FILES, "beams", -1),
    (IterateConfig, dict(policy="p", problems="q", out="o"), "reference", "latest"),
    (IterateConfig, dict(policy="p", problems="q", out="o"), "rounds", 0),
    (IterateConfig, dict(policy="p", problems="q", out="o"), "train_overrides",
     ["lora=policy", "lora_export=adapter"]),
    (DemoConfig, {}, "nproc", 0),
    (EmbeddedConfig, dict(out="o"), "vocab_size", 2),
    (TinyModelConfig, {}, "num_key_value_heads", 3),
    (ArithmeticConfig, {}, "max_steps", 1),
    (SamplingConfig, {}, "max_new_tokens", 0),
    (SearchConfig, {}, "beams", 0),
    (SearchConfig, {}, "attention_impl", "flash"),
]


@pytest.mark.parametrize("cls, needed, key, value", BAD,
                         ids=[f"{c.__name__}-{k}" for c, _, k, _ in BAD])
def test_a_bad_value_is_refused_on_construction_naming_the_key(cls, needed, key, value):
    cls(**needed)  # the needed fields alone are fine
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        cls(**{**needed, key: value})


def _config_classes():
    found = set()
    for info in pkgutil.walk_packages(oreo_fast.__path__, "oreo_fast."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if dataclasses.is_dataclass(obj) and isinstance(obj, type) \
                    and obj.__name__.endswith("Config") and obj.__module__ == module.__name__:
                found.add(obj)
    return found


def test_every_config_validates_on_construction():
    classes = _config_classes()
    assert TrainConfig in classes and SearchConfig in classes
    missing = sorted(c.__name__ for c in classes if "__post_init__" not in vars(c))
    assert not missing, f"configs without __post_init__ checks: {missing}"
    tested = {c for c, _, _, _ in BAD}
    assert classes <= tested, f"no bad-value test for {sorted(c.__name__ for c in classes - tested)}"


def test_field_docs_are_the_comments_beside_the_fields():
    docs = field_docs(EvalConfig)
    assert docs["beams"] == "B: beams per problem (0: no beam search)"
    assert docs["model"] == "policy checkpoint folder"
    assert "temperature" not in docs  # no comment, no invented help
    assert field_docs(TrainConfig)["max_steps"].startswith("stop after this many optimizer steps")


def test_flags_follow_the_annotations_and_refuse_bad_values(capsys):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, SampleConfig)
    args = parser.parse_args(["--model", "m", "--problems", "p", "--out", "o", "--k", "3",
                              "--balance", "2", "--temperature", "0.5", "--strict"])
    config = config_from_args(args, SampleConfig)
    assert (config.k, config.balance, config.temperature, config.strict) == (3, 2, 0.5, True)
    assert config.limit is None
    assert "responses per problem" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--problems", "p", "--out", "o", "--k", "three"])
    assert "k: expected an integer" in capsys.readouterr().err
    tuples = argparse.ArgumentParser()
    add_config_flags(tuples, ArithmeticConfig)
    assert config_from_args(tuples.parse_args(["--ops", "+", "-"]), ArithmeticConfig).ops == ("+", "-")


def test_load_config_names_file_and_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"beams": "many"}')
    with pytest.raises(ConfigError, match=r"c\.json: beams: expected an integer"):
        load_config(SearchConfig, path)
    with pytest.raises(ConfigError, match="unknown key 'width'"):
        load_config(SearchConfig, None, ["width=3"])
    assert load_config(SearchConfig, None, ["beams=3", "distinct=true"]).beams == 3
