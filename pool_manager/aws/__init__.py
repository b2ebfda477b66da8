"""The pool on AWS: the GPU catalog (boto3 ``DescribeInstanceTypes``), the Ray cluster config
whose autoscaler launches and terminates instances, and the operator's ``jupyter-gpu aws`` commands.

boto3 is imported only by the functions that call AWS (``pip install "jupyter-gpu[aws]"``).
"""
