"""One federated run: what every party derives from the config (``experiment``), the round
loop (``loop``), its byte ledger, run folder and checkpoints."""
