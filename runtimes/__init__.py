"""dsv4.runtimes"""
