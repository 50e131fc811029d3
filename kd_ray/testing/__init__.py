"""Test-only code: fault injection for the chaos suite. A normal run never imports it (kd_ray loads
``testing.faults`` by name only when ``KD_RAY_FAULTS`` is set)."""
