"""The stages of a run, one module each, in the order pipeline.py runs them:

    generate ─> label ─> extract ─> probe ─> baselines ─> plot ─> report

generate.py answers every question (with capture.py reading the hidden states while it generates);
label.py grades the answers and indexes the token positions; extract.py writes the hidden states at
those positions; probe.py fits a probe per cell; baselines.py scores what a probe must beat; plot.py
draws the heatmaps; report.py writes report.html (from report_assets/). Each stage reads only the run
folder's files that the stages before it wrote (runfolder/names.py); the optional stages and the analyses of
a finished run are in truthmap/analyses/. Each stage declares itself at the bottom of its module
(``register(Stage(...))``, base.py); pipeline.py and the CLI read that registry.
"""
