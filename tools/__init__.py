"""dsv4.tools"""
