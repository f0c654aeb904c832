"""Token-level preemption for decode: a GPU page budget per sequence, cold pages in host memory.

A decoding sequence's KV lives in pages of `block_tokens` tokens. Every page has a home in a
host pool (exact, never dropped); a device pool holds the pages the current step needs: the
first page(s) (attention sinks), the recent window, and the pages a query-aware score picks
(Quest-style per-page channel-wise min/max of K). See docs/preemption.md.
"""
