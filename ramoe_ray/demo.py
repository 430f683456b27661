"""What ``ramoe demo`` runs while the pipeline is being built (walking skeleton).

For each model of the demo config: load it (tiny presets are built once and cached), run the first
MGSM questions in English and in each target language through it with routing capture (UTF-8 bytes
as tokens: the tiny presets have a 256-token vocabulary), and print per MoE layer the routing
entropy and how far each language's expert usage is from English's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ramoe_ray import models as M
from ramoe_ray.config import RunConfig
from ramoe_ray.tasks import load_examples

N_QUESTIONS = 16
MAX_BYTES = 96


def _questions(task, lang: str) -> list[str]:
    return [r["question"] for r in load_examples(task, lang)[:N_QUESTIONS]]


def _byte_batch(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [list(t.encode("utf-8"))[:MAX_BYTES] for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


def _usage(model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per MoE layer: mean normalised routing entropy, and the share of tokens routed to each expert."""
    ids, mask = _byte_batch(texts)
    with torch.no_grad(), M.capture(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    r = rec.routing(mask)
    p = r.probs()[:, r.mask]  # (layers, tokens, E)
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(p.shape[-1])))
    sel = r.selected[:, r.mask]  # (layers, tokens, k)
    share = torch.stack([torch.bincount(s.flatten(), minlength=p.shape[-1]) for s in sel]).float()
    return ent.mean(-1), share / share.sum(-1, keepdim=True)


def routing_summary(cfg: RunConfig) -> None:
    task = next((t for t in cfg.tasks if t.format == "generative_numeric" and Path(t.source).is_dir()), None)
    if task is None:
        print("no local MGSM-style task in the config: nothing to route")
        return
    langs = [l for l in cfg.languages if (Path(task.source) / f"mgsm_{l}.tsv").is_file()]
    for m in cfg.models:
        model = M.load_model(m, cache_dir=cfg.cache_dir)
        en_ent, en_share = _usage(model, _questions(task, "en"))
        rows = {l: _usage(model, _questions(task, l)) for l in langs}
        layers = list(M.moe_blocks(model))
        print(f"\n{m.name} ({m.family}): routing of {N_QUESTIONS} {task.name} questions per language")
        print("  layer  entropy(en) " + " ".join(f"entropy({l}) L1-to-en({l})" for l in langs))
        for j, layer in enumerate(layers):
            cells = " ".join(
                f"{rows[l][0][j]:>11.3f} {(rows[l][1][j] - en_share[j]).abs().sum():>12.3f}" for l in langs
            )
            print(f"  {layer:>5}  {en_ent[j]:>11.3f} {cells}")
