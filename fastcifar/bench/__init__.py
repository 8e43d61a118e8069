"""`fastcifar bench`: loader and model throughput, latency, memory and energy, measured side by side."""
