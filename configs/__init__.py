"""The presets and recipes that ship with LoSA-TAL: ``datasets/`` (extraction presets, read by
``extract --preset NAME``), ``train/`` (training recipes, ``train --config NAME``) and ``demo/``.

A package only so that an install carries these files: setup.cfg installs this folder as
``losa_tal_configs`` (a name no other project uses), and ``losa_tal.shipped_configs`` finds
it, in a checkout or an install alike.
"""
