"""Runs: what a stage needs (driver-side checks, resume), the files a run leaves (metrics, failures,
summary, teacher export), progress lines, and the reports and plots made from finished runs."""
