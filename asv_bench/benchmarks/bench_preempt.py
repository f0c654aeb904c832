"""Decode under a page budget (issue 15): one step of select + fetch + attention per layer, on CPU.

The torch reference path a machine without a GPU takes, at a 1/8 budget of a sequence of
`context` tokens in 16-token pages (Llama-like heads at a small head count), against exact mode
(every page resident, no selection) on the same sequence. Queries drift between steps, so some
pages are fetched from the host pool every step ("1/8, select every 8": `DecodeBudget.select_every`,
a selection every 8th step, the others over the kept pages). `scripts/bench_preempt_gpu.py` gives the GPU table.
"""

import math

import torch

from tierkv import DecodeBudget, KVLayout, PageManager

H, HQ, D, BT = 2, 8, 64, 16


class DecodeStep:
    """`PageManager.append` + `attend` for one layer, batch of 4 sequences."""

    params = ([2048, 8192], ["exact", "1/8", "1/8, select every 8"])
    param_names = ["context", "budget"]
    timeout = 300

    def setup(self, context: int, budget: str) -> None:
        torch.manual_seed(0)
        layout = KVLayout(1, 2, H, D, torch.float32, BT)
        pages = context // BT + 64
        every = 8 if "select every" in budget else 1
        b = DecodeBudget() if budget == "exact" else DecodeBudget(fraction=0.125, select_every=every)
        self.batch = 4
        self.m = PageManager(layout, b, device_pages=self.batch * b.wanted(pages), host_pages=self.batch * pages,
                             max_seqs=self.batch, max_pages=pages)
        for _ in range(self.batch):
            kv = [torch.randn(context, H, D)]
            self.m.add(kv, kv)
        self.seqs = list(range(self.batch))
        self.q0 = torch.randn(self.batch, HQ, D)
        self.scale = 1 / math.sqrt(D)

    def time_step(self, context: int, budget: str) -> None:
        k = torch.randn(self.batch, H, D)
        self.m.append(0, self.seqs, k, k)
        self.m.attend(0, self.seqs, self.q0 + 0.3 * torch.randn(self.batch, HQ, D), self.scale)
