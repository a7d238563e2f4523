"""Model cascades: early-exit heads and confidence measures (exit_heads, early_exit), sequential (FrugalGPT)
and routing (RouteLLM) cascades over effitrans models. Import the submodules directly."""
