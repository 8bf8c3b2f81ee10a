"""Mutual transfer of local attention maps (Cheng et al. 2022): maps, the peer team, the
experiment. See docs/mutual_transfer.md."""
