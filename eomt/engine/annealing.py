"""Mask annealing: the probability of masked attention in each query block, over training.

Block k keeps masked attention (p = 1) until start_k, then p decays polynomially to 0 at end_k.
By default each block anneals over T/6 of the T iterations, the blocks one after another with
their starts spread evenly so that annealing covers T/6 .. 5T/6. For COCO ViT-L (T = 88692,
4 blocks) that gives starts 14782, 29564, 44346, 59128 and ends 29564, 44346, 59128, 73910.
"""


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


def default_anneal_steps(total_iters: int, num_blocks: int) -> tuple[list[int], list[int]]:
    """(starts, ends) per block for a run of `total_iters` iterations."""
    duration = total_iters / 6
    spacing = total_iters / 2 / (num_blocks - 1) if num_blocks > 1 else 0.0
    starts = [_round_half_up(duration + k * spacing) for k in range(num_blocks)]
    ends = [start + max(1, _round_half_up(duration)) for start in starts]
    return starts, ends


class MaskAnnealing:
    """p_k(iteration) for each query block k."""

    def __init__(self, starts: list[int], ends: list[int], power: float = 0.9):
        if len(starts) != len(ends):
            raise ValueError(f"anneal starts {starts} and ends {ends} differ in length")
        for start, end in zip(starts, ends):
            if end <= start:
                raise ValueError(f"anneal end {end} must come after its start {start}")
        self.starts, self.ends, self.power = list(starts), list(ends), power

    @classmethod
    def from_cfg(cls, cfg, blocks: int) -> "MaskAnnealing":
        """The schedule of `solver.anneal_*` for a model of `blocks` masked query blocks."""
        s = cfg.solver
        if len(s.anneal_start) or len(s.anneal_end):
            starts, ends = list(s.anneal_start), list(s.anneal_end)
            if len(starts) != blocks:
                raise ValueError(
                    f"solver.anneal_start has {len(starts)} entries for a model of {blocks} "
                    "query blocks (model.num_query_blocks; PMT: pmt.num_blocks)"
                )
        else:
            starts, ends = default_anneal_steps(s.max_iter, blocks)
        return cls(starts, ends, s.anneal_power)

    def probs(self, iteration: int) -> list[float]:
        probs = []
        for start, end in zip(self.starts, self.ends):
            if iteration < start:
                probs.append(1.0)
            elif iteration >= end:
                probs.append(0.0)
            else:
                probs.append((1.0 - (iteration - start) / (end - start)) ** self.power)
        return probs
