"""Beam search (and greedy search, one beam) for decoders that continue a prompt token by token.

The decoder is seen through ``log_probs(sequences, positions, owners)``: for each row of
``sequences`` (token ids, zero-padded to the context length), the log-probabilities of the token
that follows the one at ``positions``; ``owners`` says which input each row continues, so the
decoder can pair it with that input's image. ``allowed(step)`` restricts the vocabulary at each
step (e.g. only location tokens while a box is written). A hypothesis ends with the end token;
its score is the sum of its tokens' log-probabilities divided by ``length ** length_penalty``
(length: tokens generated, end token included). As in Hugging Face's beam search, an ending is
kept only when it ranks among the step's best ``num_beams`` candidates, and an input stops once
``num_beams`` of its hypotheses have ended (``early_stopping=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

LogProbs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Hypothesis:
    """One generated continuation: its tokens (end token excluded) and its length-normalised score."""

    tokens: tuple[int, ...]
    score: float
    finished: bool


def _normalised(total: float, length: int, length_penalty: float) -> float:
    return total / max(1, length) ** length_penalty


def beam_search(
    log_probs: LogProbs,
    prompts: Sequence[Sequence[int]],
    context_length: int,
    end_id: int,
    max_new_tokens: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    allowed: Callable[[int], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> list[list[Hypothesis]]:
    """The ``num_beams`` best continuations of each prompt, best first.

    Args:
        log_probs: The decoder, see the module docstring.
        prompts: Each input's token ids so far (start token and prompt).
        context_length: Length of the rows passed to ``log_probs``; generation stops there.
        end_id: The token that ends a hypothesis.
        max_new_tokens: Tokens generated at most per hypothesis. Hypotheses stopped by it or by the
            context length are kept, unfinished, ranked after finished ones; an input with no possible
            token at all gets one empty hypothesis of score ``-inf``.
        num_beams: Beams per input; 1 is greedy search.
        length_penalty: Exponent of the length that divides a hypothesis' summed log-probability.
        allowed: Bool mask over the vocabulary for each step; None allows every token.
        device: Where the rows are built.
    """
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest >= context_length:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in a context of {context_length}")
    beams: list[list[tuple[tuple[int, ...], float]]] = [[(tuple(p), 0.0)] for p in prompts]
    finished: list[list[Hypothesis]] = [[] for _ in prompts]
    stopped: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        rows = [(i, seq, total) for i, live in enumerate(beams) for seq, total in live]
        if not rows:
            break
        sequences = torch.zeros(len(rows), context_length, dtype=torch.long, device=device)
        for r, (_, seq, _) in enumerate(rows):
            sequences[r, : len(seq)] = torch.tensor(seq, device=device)
        positions = torch.tensor([len(seq) - 1 for _, seq, _ in rows], device=device)
        owners = torch.tensor([i for i, _, _ in rows], device=device)
        scores = log_probs(sequences, positions, owners).float()
        if allowed is not None:
            scores = scores.masked_fill(~allowed(step).to(scores.device), float("-inf"))
        scores = scores + torch.tensor([total for _, _, total in rows], device=scores.device)[:, None]
        possible = torch.isfinite(scores).sum(dim=1).tolist()  # tokens each row may continue with
        beams = [[] for _ in prompts]
        for i in range(len(prompts)):
            mine = [r for r, row in enumerate(rows) if row[0] == i]
            if not mine or len(finished[i]) >= num_beams:
                continue
            flat = scores[mine].flatten()
            values, indices = flat.topk(min(2 * num_beams, sum(possible[r] for r in mine)))
            for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist(), strict=True)):
                row, token = mine[index // scores.shape[1]], index % scores.shape[1]
                seq = rows[row][1]
                generated = len(seq) - len(prompts[i]) + 1
                if token == end_id:
                    if rank >= num_beams:  # an ending below the best num_beams candidates is not kept
                        continue
                    tokens = seq[len(prompts[i]) :]
                    finished[i].append(Hypothesis(tokens, _normalised(value, generated, length_penalty), True))
                    if len(finished[i]) >= num_beams:
                        break
                else:
                    beams[i].append((seq + (token,), value))
                    if len(beams[i]) == num_beams:
                        break
        for i, live in enumerate(beams):  # a beam that fills the context stops there, unfinished
            full = [(seq, total) for seq, total in live if len(seq) >= context_length]
            stopped[i] += full
            beams[i] = [beam for beam in live if len(beam[0]) < context_length]
    results = []
    for i, prompt in enumerate(prompts):
        unfinished = [
            Hypothesis(seq[len(prompt) :], _normalised(total, len(seq) - len(prompt), length_penalty), False)
            for seq, total in beams[i] + stopped[i]
        ]
        ranked = sorted(finished[i], key=lambda h: -h.score) + sorted(unfinished, key=lambda h: -h.score)
        results.append(ranked[:num_beams] or [Hypothesis((), float("-inf"), False)])
    return results
