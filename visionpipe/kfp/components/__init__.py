"""The thin KFP components: one module per phase, importing only kfp at top level; each body imports its phase core
(visionpipe.phases.<name>) and calls it, so compiling a graph never imports torch."""
