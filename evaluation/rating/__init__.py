"""Blinded expert rating of real and generated images: `medsd rate` (experiments/rate.py).

study.py holds a study (design, drawn and re-encoded images, queues, answers) in one SQLite file;
server.py serves it to raters as a Flask app; agreement.py has the statistics and report.py
turns the answers into the report (`rating_section` is its markdown, for a sweep report).
"""
