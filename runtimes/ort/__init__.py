"""dsv4.runtimes.ort"""
