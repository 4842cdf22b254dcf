"""Reliability tools: the hostile-guest fuzzer and the soak runs behind ``make fuzz`` / ``make soak``.

Above the platform and the observation tools; nothing is imported here.
"""
