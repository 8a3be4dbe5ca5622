"""The small server kernel every Fresco service uses: settings, server factory, health, reflection,
error mapping, tracing, metrics and structured logs."""
