"""Loading models, configs, tokenizers and adapters: the one door to transformers and peft.

Every `from_pretrained` / `from_config` of the project is here. Every one passes
`trust_remote_code=False` (and every `from_pretrained` `local_files_only=True`): a model
directory never runs code and never reaches the network; peft's `PeftModel` builds only peft's
own tuners, whatever the adapter says. Before transformers reads anything, `refuse_remote_code`
reads the directory's `config.json` and `tokenizer_config.json` as plain JSON and refuses a
directory that asks for custom code, so the user gets one line saying why instead of
transformers' "Do you wish to run the custom code? [y/N]" prompt.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from surgery.errors import CorruptFileError, DataError, InputNotFoundError, MismatchError, SurgeryError

PathLike = str | Path

_NEVER_RUN = "surgery never runs code from a model directory: use a model whose architecture transformers supports natively"


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else CUDA when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_directory(path: PathLike) -> Path:
    """`path` as a local Hugging Face model directory (one with config.json), else `InputNotFoundError`.

    A path that is not a directory would be taken by transformers for a Hub repository id."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise InputNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    return directory


def _read_json(file: Path) -> dict[str, Any] | None:
    """The JSON object in `file`, or None when there is no such file."""
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"{file} is not valid JSON ({exc}); restore the file from the model's source") from None
    if not isinstance(value, dict):
        raise CorruptFileError(f"{file} holds a JSON {type(value).__name__}, not an object; restore the file")
    return value


def _classes(auto_map: Any) -> str:
    """The class references of an `auto_map` (a dict of strings or of [slow, fast] lists), comma-joined."""
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    refs: list[str] = []
    for value in values:
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    return ", ".join(refs) or json.dumps(auto_map)


def _native_model_types() -> Any:
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING


def refuse_remote_code(directory: PathLike) -> None:
    """Refuse a model directory whose `config.json` or `tokenizer_config.json` asks for custom code.

    Refused, with a `SurgeryError` naming the file:
    - any `auto_map`, in either file. An `auto_map` names a Python file of the directory
      (or of another repository); whether that code is the same as a class transformers
      ships cannot be known without reading or running it, so even an `auto_map` beside a
      native `model_type` is refused (the message says the `model_type` is native, so the
      user can delete `auto_map` and load it with transformers' own class knowingly);
    - a `model_type` transformers does not know natively (not in `CONFIG_MAPPING`): only
      custom code could build it.
    Reads the files as JSON only; nothing of the directory is imported or executed.
    """
    directory = Path(directory)
    config_file = directory / "config.json"
    config = _read_json(config_file)
    model_type = config.get("model_type") if config is not None else None
    for file, content in ((config_file, config), (directory / "tokenizer_config.json", None)):
        content = content if content is not None else _read_json(file)
        if content is None or not content.get("auto_map"):
            continue
        hint = ""
        if isinstance(model_type, str) and model_type in _native_model_types():
            hint = (f" (its model_type {model_type!r} is native: deleting auto_map from {file.name} loads it with "
                    "transformers' own code)")
        raise SurgeryError(f"{file} asks for custom code (auto_map: {_classes(content['auto_map'])}); {_NEVER_RUN}{hint}")
    if model_type is not None and (not isinstance(model_type, str) or model_type not in _native_model_types()):
        import transformers

        raise SurgeryError(f"{config_file} has model_type {model_type!r}, which transformers {transformers.__version__} "
                           f"does not know natively; {_NEVER_RUN}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_config(path: PathLike) -> Any:
    """The transformers config of a model directory (a `PretrainedConfig`), native classes only."""
    from transformers import AutoConfig

    directory = model_directory(path)
    refuse_remote_code(directory)
    try:
        return AutoConfig.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise CorruptFileError(f"{directory / 'config.json'} is not a config transformers knows ({_first_line(exc)})") from None


def load_tokenizer(path: PathLike) -> Any:
    """The tokenizer saved in a directory (the model's, or a tokenizer-only one); `DataError` if there is none.

    A tokenizer saved as a plain `tokenizer.json` (class `TokenizersBackend` or
    `PreTrainedTokenizerFast`) is loaded as that class: `AutoTokenizer` would swap in the
    model type's own tokenizer class, which can encode the same vocabulary differently."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(path)
    if not directory.is_dir():
        raise InputNotFoundError(f"{directory} is not a directory; give the model directory that holds the tokenizer")
    refuse_remote_code(directory)
    saved = _read_json(directory / "tokenizer_config.json") or {}
    loader = PreTrainedTokenizerFast if saved.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast") \
        else AutoTokenizer
    try:
        return loader.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"no usable tokenizer in {directory} ({_first_line(exc)}); save the model's tokenizer beside it") \
            from None


def load_causal_lm(path: PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """A causal LM with its weights from a model directory, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    directory = model_directory(path)
    refuse_remote_code(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, trust_remote_code=False,
                                                     local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"cannot load the model in {directory} ({_first_line(exc)})") from None
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to() as its own wrapper


def model_from_config(config: Any, *, causal_lm: bool = True, **kwargs: Any) -> torch.nn.Module:
    """A freshly initialised model of `config` (from `load_config`): with its LM head, or the bare
    decoder with `causal_lm=False`. Build it under `torch.device("meta")` for a weightless shell."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    return auto.from_config(config, trust_remote_code=False, **kwargs)


def _tie_embeddings(model: Any, tied: bool) -> None:
    """Share (or stop sharing) one tensor between the input embedding and the output head."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if tied:
        head.weight = embedding.weight
    else:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = tied


def _is_tied(model: Any) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight is embedding.weight


def apply_adapter(model: Any, adapter: PathLike) -> Any:
    """`model` with the peft adapter in `adapter` merged in memory, as `surgery merge` writes it.

    A tied embedding is untied first, so a LoRA on `lm_head` changes only the output head and
    one on `embed_tokens` only the input lookup (merging into the one shared tensor would
    change both, huggingface/peft#2777); when the adapter changed neither, they are tied
    again. Returns the plain transformers model (no peft wrapper)."""
    from peft import PeftModel

    apath = Path(adapter)
    if not (apath / "adapter_config.json").is_file():
        raise InputNotFoundError(f"{apath} is not a peft adapter directory (no adapter_config.json)")
    tied = _is_tied(model)
    if tied:
        _tie_embeddings(model, tied=False)
    try:
        with warnings.catch_warnings():  # peft's deprecation noise from transformers
            warnings.simplefilter("ignore", FutureWarning)
            merged = PeftModel.from_pretrained(model, str(apath), is_trainable=False).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise MismatchError(f"adapter {apath} does not fit the model: {_first_line(exc)}") from None
    if tied and torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight):
        _tie_embeddings(merged, tied=True)
    return merged.eval()
