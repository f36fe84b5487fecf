"""The loading module: what it refuses, and that what it loads is the saved model with
`trust_remote_code=False` on every transformers/peft call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.errors import CorruptFileError, InputNotFoundError, SurgeryError
from surgery.model import load
from surgery.testbed.tokenizer import save_tokenizer
from tests.factories import make_adapter, make_base


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = make_base(tmp_path_factory.mktemp("load") / "llama", "llama")
    save_tokenizer(out)
    return out


def edited_copy(src: Path, dst: Path, file: str, **changes: object) -> Path:
    shutil.copytree(src, dst)
    content = json.loads((dst / file).read_text())
    content.update(changes)
    (dst / file).write_text(json.dumps(content))
    return dst


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_a_native_model_is_not_refused(model_dir):
    load.refuse_remote_code(model_dir)


def test_tokenizer_auto_map_is_refused(model_dir, tmp_path):
    d = edited_copy(model_dir, tmp_path / "m", "tokenizer_config.json",
                    auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    with pytest.raises(SurgeryError) as exc:
        load.refuse_remote_code(d)
    msg = one_line(exc)
    assert msg.startswith(f"{d / 'tokenizer_config.json'} asks for custom code (auto_map: tokenization_evil.EvilTokenizer)")
    assert "never runs code from a model directory" in msg


def test_auto_map_beside_a_native_model_type_is_refused_with_a_hint(model_dir, tmp_path):
    d = edited_copy(model_dir, tmp_path / "m", "config.json", auto_map={"AutoConfig": "configuration_x.XConfig"})
    with pytest.raises(SurgeryError) as exc:
        load.load_config(d)
    msg = one_line(exc)
    assert msg.startswith(f"{d / 'config.json'} asks for custom code (auto_map: configuration_x.XConfig)")
    assert "model_type 'llama' is native" in msg


def test_unknown_model_type_is_refused(model_dir, tmp_path):
    d = edited_copy(model_dir, tmp_path / "m", "config.json", model_type="my_private_arch")
    with pytest.raises(SurgeryError) as exc:
        load.load_tokenizer(d)  # the tokenizer too: AutoTokenizer would read config.json
    assert one_line(exc).startswith(f"{d / 'config.json'} has model_type 'my_private_arch', which transformers")


def test_bad_json_and_missing_directory(model_dir, tmp_path):
    d = shutil.copytree(model_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="config.json is not valid JSON"):
        load.refuse_remote_code(d)
    with pytest.raises(InputNotFoundError, match="not a Hugging Face model directory"):
        load.load_causal_lm(tmp_path / "nowhere")  # never taken for a Hub repository id


def test_default_device():
    assert load.default_device("cpu") == torch.device("cpu")
    assert load.default_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_loads_pass_trust_remote_code_false(model_dir, tmp_path, monkeypatch):
    """Every transformers/peft entry point is called with trust_remote_code=False, and what comes
    back is the saved model: its weights are the file's, its tokenizer encodes as the testbed's."""
    import peft
    import transformers

    adapter = make_adapter(model_dir, tmp_path / "adapter", target_modules=["q_proj"])
    calls: list[tuple[str, dict]] = []

    def record(owner: object, attr: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*args: object, **kwargs: object) -> object:
            calls.append((f"{getattr(owner, '__name__', owner)}.{attr}", kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapper)

    for owner in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.PreTrainedTokenizerFast,
                  transformers.AutoTokenizer, peft.PeftModel):
        record(owner, "from_pretrained")
    for owner in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        record(owner, "from_config")

    config = load.load_config(model_dir)
    model = load.load_causal_lm(model_dir)
    tok = load.load_tokenizer(model_dir)
    with torch.device("meta"):
        load.model_from_config(config, causal_lm=False)
    adapted = load.apply_adapter(load.load_causal_lm(model_dir), adapter)

    names = [n for n, _ in calls]
    assert names.count("AutoModelForCausalLM.from_pretrained") == 2 and "AutoConfig.from_pretrained" in names
    assert f"{transformers.PreTrainedTokenizerFast.__name__}.from_pretrained" in names  # TokenizersBackend in v5
    assert "AutoModel.from_config" in names
    assert "PeftModel.from_pretrained" in names
    transformers_calls = [k for n, k in calls if not n.startswith("PeftModel")]
    assert all(k.get("trust_remote_code") is False for k in transformers_calls), calls
    assert all(k.get("local_files_only") is True for n, k in calls if n.endswith("from_pretrained")
               and not n.startswith("PeftModel")), calls

    saved = load_file(model_dir / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert not model.training
    from surgery.testbed.tokenizer import make_tokenizer

    text = "how do i make a bomb ?"
    assert tok(text)["input_ids"] == make_tokenizer()(text)["input_ids"]
    assert not isinstance(adapted, peft.PeftModel)
