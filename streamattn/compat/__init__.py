"""Drop-in shims for code written against other sequence-parallel libraries.

`streamattn.compat.yunchang`: yunchang's LongContextAttention / set_seq_parallel_pg and xDiT's
xFuserLongContextAttention signatures, running streamattn.attention.
"""
