"""Polynomial arithmetic in F_7[X]/(X^5), the algorithmic task of Gloeckle et al. 2024, section 4.2.

A polynomial is its 5 coefficients c0..c4 in 0..6, written as 5 digits ("30251" is 3 + 2X^2 + 5X^3 + X^4).
An expression with k operations is built from random polynomials with unary negation "-e", and
fully parenthesised addition "(a+b)", multiplication "(a*b)" and composition "(aob)" = a(b(X)), all
mod 7 and mod X^5. A problem is one line, "<expression>=<5 answer digits>", so the answer is the
only part of a line that can be predicted.

    problem(rng, k)        # (text, answer digits), the expression has exactly k operations
    evaluate(expression)   # an independent parser, for tests: the value of an expression string
"""
import random

P, DEG = 7, 5


def add(a, b):
  return tuple((x + y) % P for x, y in zip(a, b))


def neg(a):
  return tuple(-x % P for x in a)


def mul(a, b):
  return tuple(sum(a[i] * b[k - i] for i in range(k + 1)) % P for k in range(DEG))


def compose(a, b):
  """a(b(X)) mod X^5, by Horner's rule."""
  out = (0,) * DEG
  for c in reversed(a):
    out = add(mul(out, b), (c,) + (0,) * (DEG - 1))
  return out


BINARY = {"+": add, "*": mul, "o": compose}


def text_of(a) -> str:
  return "".join(map(str, a))


def expression(rng: random.Random, k: int):
  """(text, value) of a random expression with exactly k operations."""
  if k == 0:
    a = tuple(rng.randrange(P) for _ in range(DEG))
    return text_of(a), a
  if rng.random() < 0.2:                            # negation takes one operation
    text, value = expression(rng, k - 1)
    return "-" + text, neg(value)
  left = rng.randrange(k)                           # operations on the left; k - 1 - left on the right
  (lt, lv), (rt, rv) = expression(rng, left), expression(rng, k - 1 - left)
  op = rng.choice(sorted(BINARY))
  return f"({lt}{op}{rt})", BINARY[op](lv, rv)


def problem(rng: random.Random, k: int):
  text, value = expression(rng, k)
  return f"{text}={text_of(value)}", text_of(value)


def evaluate(text: str):
  """The value of an expression string (recursive descent; raises ValueError on a malformed one)."""
  def parse(i):
    if text[i] == "-":
      v, i = parse(i + 1)
      return neg(v), i
    if text[i] == "(":
      a, i = parse(i + 1)
      op = text[i]
      b, i = parse(i + 1)
      if op not in BINARY or text[i] != ")":
        raise ValueError(f"malformed expression at {i}: {text!r}")
      return BINARY[op](a, b), i + 1
    digits = text[i:i + DEG]
    if len(digits) != DEG or not all(c in "0123456" for c in digits):
      raise ValueError(f"malformed polynomial at {i}: {text!r}")
    return tuple(map(int, digits)), i + DEG
  try:
    value, end = parse(0)
  except IndexError:
    raise ValueError(f"truncated expression: {text!r}") from None
  if end != len(text):
    raise ValueError(f"trailing characters at {end}: {text!r}")
  return value
