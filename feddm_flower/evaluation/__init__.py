"""How a model is judged and kept: global loss, EMA, FID/KID, and the run directory."""
