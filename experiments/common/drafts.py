"""The benchmarks' names for speculative drafting schemes, as decode.run's keywords."""


def draft_options(kind: str, draft_heads=None) -> dict:
  """decode.run's draft keywords for a scheme name: chain, auto, tree, bestfirst (draft_heads as the cap),
  chainK (a chain of K-1 drafts, whatever draft_heads says), treeN / bestfirstN (N nodes), bestfirstNxK (N
  nodes among each head's top K) or autotreeN (auto, with the static tree of N nodes as one more budget)."""
  if kind.startswith("chain") and kind[5:].isdigit():
    return {"draft": "chain", "draft_heads": int(kind[5:])}
  if kind.startswith("autotree") and kind[8:].isdigit():
    return {"draft": "auto", "draft_heads": draft_heads, "tree_nodes": int(kind[8:])}
  for tree in ("bestfirst", "tree"):
    size = kind[len(tree):].split("x") if kind.startswith(tree) and kind != tree else None
    if size and all(part.isdigit() for part in size) and len(size) <= (2 if tree == "bestfirst" else 1):
      return {"draft": tree, "draft_heads": draft_heads, "tree_nodes": int(size[0]),
              **({"tree_top": int(size[1])} if len(size) == 2 else {})}
  return {"draft": kind, "draft_heads": draft_heads}
