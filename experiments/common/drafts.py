"""The benchmarks' names for speculative drafting schemes, as decode.run's keywords."""


def draft_options(kind: str, draft_heads=None) -> dict:
  """decode.run's draft keywords for a scheme name: chain, auto, tree, bestfirst (draft_heads as the cap),
  chainK (a chain of K-1 drafts, whatever draft_heads says), treeN / bestfirstN (N nodes) or bestfirstNxK (N
  nodes among each head's top K)."""
  if kind.startswith("chain") and kind[5:].isdigit():
    return {"draft": "chain", "draft_heads": int(kind[5:])}
  for tree in ("bestfirst", "tree"):
    size = kind[len(tree):].split("x") if kind.startswith(tree) and kind != tree else None
    if size and all(part.isdigit() for part in size) and len(size) <= (2 if tree == "bestfirst" else 1):
      return {"draft": tree, "draft_heads": draft_heads, "tree_nodes": int(size[0]),
              **({"tree_top": int(size[1])} if len(size) == 2 else {})}
  return {"draft": kind, "draft_heads": draft_heads}
