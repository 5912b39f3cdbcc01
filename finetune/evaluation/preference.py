"""Held-out pairs scored by a model: the log-probability of each answer (summed over its tokens, as DPO sums it),
pair accuracy and margins, for `finetune eval` of a preference run and for tests."""

from __future__ import annotations

from dataclasses import dataclass


def answer_logps(model, rows: list[dict], keys=("chosen", "rejected"), batch_size: int = 8) -> dict[str, list[float]]:
    """For each of `keys`, each row's log-probability of `{key}_ids` after `prompt_ids` (answer tokens only)."""
    import torch

    device = next(model.parameters()).device
    out = {key: [] for key in keys}
    sequences = [(row["prompt_ids"], row[f"{key}_ids"], key) for row in rows for key in keys]
    model_was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            longest = max(len(p) + len(a) for p, a, _ in chunk)
            ids = torch.zeros(len(chunk), longest, dtype=torch.long)
            mask = torch.zeros(len(chunk), longest, dtype=torch.long)
            for i, (prompt, answer, _) in enumerate(chunk):
                ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
                mask[i, : len(prompt) + len(answer)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
            for i, (prompt, answer, key) in enumerate(chunk):
                out[key].append(logps[i, len(prompt) - 1 : len(prompt) - 1 + len(answer)].sum().item())
    model.train(model_was_training)
    return out


@dataclass
class PairScores:
    """One model's log-probabilities of the held-out pairs' answers."""

    chosen: list[float]
    rejected: list[float]

    @property
    def likelihood_accuracy(self) -> float:
        """The fraction of pairs whose chosen answer is the likelier one."""
        return sum(c > r for c, r in zip(self.chosen, self.rejected)) / len(self.chosen)

    def against(self, reference: PairScores, beta: float) -> dict:
        """DPO's implicit rewards against `reference`: pair accuracy (margin > 0) and the mean margin."""
        margins = [
            beta * ((c - rc) - (r - rr))
            for c, r, rc, rr in zip(self.chosen, self.rejected, reference.chosen, reference.rejected)
        ]
        return {"pair_accuracy": sum(m > 0 for m in margins) / len(margins), "mean_margin": sum(margins) / len(margins)}


def pair_scores(model, rows: list[dict], batch_size: int = 8) -> PairScores:
    logps = answer_logps(model, rows, batch_size=batch_size)
    return PairScores(logps["chosen"], logps["rejected"])
