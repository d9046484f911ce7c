"""One module per pattern, each the same shape: its options, its strategy, and the events it emits.

Pattern modules import nothing from Prometheus, OpenTelemetry or logging: they emit events
(:mod:`buttress.events`) and subscribers turn those into metrics, spans and logs.
"""
