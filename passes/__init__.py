"""dsv4.passes"""
