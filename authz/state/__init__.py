"""State shared between replicas and workers, kept beside the check path: the Redis connection
(``redisconn``) and the tasks that sync local snapshots with it (``ratelimit_sync``). The check
path never awaits anything here; it reads local state that these tasks keep in sync."""
