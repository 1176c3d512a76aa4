"""Composition root of OpenKCM Global Resilience: CLI, configuration, embedded broker, drills."""
