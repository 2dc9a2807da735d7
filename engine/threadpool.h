/* threadpool.h: a fixed pool of compute workers for data-parallel loops.
 *
 * The engine thread calls eng_threadpool_run(); the calling thread takes part as
 * worker 0, so a pool of n threads starts n - 1 workers. Workers spin briefly
 * between jobs (a forward pass issues hundreds of short jobs) and then sleep on
 * a condition variable, so an idle engine costs no CPU. Only one thread may call
 * eng_threadpool_run() at a time (the pool's owner, the engine thread). */
#ifndef ENG_THREADPOOL_H
#define ENG_THREADPOOL_H

typedef struct eng_threadpool eng_threadpool;

/* fn(ctx, task, worker) is called once for every task in [0, n_tasks), from
 * worker ids in [0, n_threads). Tasks are handed out dynamically. */
typedef void (*eng_task_fn)(void *ctx, int task, int worker);

/* n_threads <= 0 means the number of online cores. NULL on failure. */
eng_threadpool *eng_threadpool_create(int n_threads);
void eng_threadpool_destroy(eng_threadpool *tp);
int eng_threadpool_size(const eng_threadpool *tp);
/* Runs every task and returns when all are done. tp may be NULL: then the
 * caller runs every task itself with worker id 0. */
void eng_threadpool_run(eng_threadpool *tp, eng_task_fn fn, void *ctx, int n_tasks);

#endif
