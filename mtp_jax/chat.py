"""Chat prompts: a model's own jinja chat template (as transformers and llama.cpp apply it) around a message.

    text = chat.render(tokenizer, "How do I reverse a list?")      # one user turn, ready for the reply
    stop = chat.end_of_turn_id(tokenizer)                          # the token that ends the reply

The template travels with an imported model (GGUF `tokenizer.chat_template`, or a Hugging Face
directory's tokenizer_config.json) in W/special_tokens.json. It is rendered in jinja2's immutable
sandbox, with the variables transformers passes: messages, add_generation_prompt, bos_token, eos_token.
"""
from __future__ import annotations

from typing import Optional

from mtp_jax.errors import UserError


def template_of(tokenizer) -> str:
  template = getattr(tokenizer, "chat_template", None)
  if not template:
    raise UserError("--chat: this model has no chat template (only models imported with one, e.g. from a GGUF "
                    "file or a Hugging Face directory with tokenizer_config.json, have it); drop --chat to continue "
                    "the prompt as plain text")
  return template


def _token(tokenizer, token_id: Optional[int]) -> str:
  if token_id is None or token_id < 0 or not hasattr(tokenizer, "tok"):
    return ""
  return tokenizer.tok.id_to_token(int(token_id)) or ""


def render(tokenizer, message: str, system: Optional[str] = None) -> str:
  """The prompt text for one user message (and an optional system message), ending where the reply begins."""
  try:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError:
    raise UserError("--chat needs jinja2: pip install jinja2")
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  try:
    return env.from_string(template_of(tokenizer)).render(
        messages=messages, add_generation_prompt=True, bos_token=_token(tokenizer, tokenizer.bos_id),
        eos_token=_token(tokenizer, tokenizer.eos_id))
  except jinja2.TemplateError as e:
    raise UserError(f"--chat: the model's chat template does not render ({type(e).__name__}: {e})")


def end_of_turn_id(tokenizer) -> int:
  """The token that ends an assistant turn: the model's end-of-turn token where it names one, else its EOS."""
  eot = getattr(tokenizer, "eot_id", None)
  return int(eot) if eot is not None and eot >= 0 else int(tokenizer.eos_id)
