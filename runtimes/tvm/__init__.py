"""dsv4.runtimes.tvm"""
