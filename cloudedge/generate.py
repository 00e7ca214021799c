"""`cloudedge generate`: sample text from a language model a run exported, through the files any
Hugging Face user would load (``AutoTokenizer`` + ``AutoModelForCausalLM``), not project code.

The prompt is preceded by EOS: in the pre-training stream every document follows an EOS, so EOS is
what the model has seen before a document starts. Sampling stops at the next EOS (the document's
end) or after ``max_new_tokens``, whichever comes first; the prompt and the text that follows it
are returned together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cloudedge.errors import InputError


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token. ``temperature`` 0 is greedy; ``top_k`` 0 keeps every token."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise InputError(f"--temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"--top-k: must be >= 0, got {self.top_k}")


def model_dir_of(run_dir: str | Path) -> Path:
    """The exported model directory of a run (``RUN/model``), or ``run_dir`` itself if it is one."""
    path = Path(run_dir)
    for candidate in (path, path / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    if not path.exists():
        raise InputError(f"{path}: no such run directory")
    raise InputError(f"{path}: no exported model (neither {path}/config.json nor {path}/model/config.json)")


def generate_text(run_dir: str | Path, prompt: str, sampling: Sampling | None = None) -> str:
    """The prompt followed by the text the run's language model samples after it."""
    from transformers import AutoTokenizer

    from cloudedge.models.zoo import _quiet, load_local

    sampling = sampling or Sampling()
    sampling.check()
    directory = model_dir_of(run_dir)
    model = load_local(directory)
    if not model.can_generate():
        raise InputError(f"{directory}: a {type(model).__name__} does not generate text (need a causal LM, "
                         "e.g. a 'pretrain' run with task 'lm')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"{directory}: no usable tokenizer files ({str(err).splitlines()[0]})") from None
    eos = tokenizer.eos_token_id
    ids = [eos, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    positions = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
    if len(ids) >= positions:
        raise InputError(f"--prompt: {len(ids) - 1} tokens leave no room in the model's {positions} positions")
    input_ids = torch.tensor([ids], dtype=torch.long)
    options: dict[str, object] = {"do_sample": False}
    if sampling.temperature > 0:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k}
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad(), _quiet():
        torch.manual_seed(sampling.seed)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=min(sampling.max_new_tokens, positions - len(ids)),
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **options)
    return tokenizer.decode(out[0, 1:], skip_special_tokens=True)
