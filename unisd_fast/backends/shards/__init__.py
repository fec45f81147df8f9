"""A head split by vocabulary rows over the ranks of a process group: the shard layout
(``layout``), the all-reduce of the per-row statistics (``combine``) and the jsd sums that
need the combined normalisers (``jsd``). docs/kernels.md, "Vocabulary-parallel heads"."""
