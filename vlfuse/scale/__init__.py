"""Batch jobs on a Ray cluster: caption or embed a photo library with many workers, each loading its model once.

``vlfuse.scale.cluster`` connects to (or starts) Ray and says how to install it where it is missing;
``vlfuse.scale.batch`` runs a task's pipeline over chunks of files with Ray Data and hands the rows back to the
caller in input order. Importing this package does not import Ray: it is an optional extra (``vlfuse[ray]``).
"""
