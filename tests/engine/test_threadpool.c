/* test_threadpool.c: engine/threadpool.c. Every task of every job runs exactly
 * once, from a worker id in range, and the job is complete when run()
 * returns; pools of several sizes, jobs of 0..100 tasks (fewer tasks than
 * threads included), many jobs back to back, and jobs issued after the
 * workers have gone to sleep. */
#include <criterion/criterion.h>

#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "engine/threadpool.h"

#define MAX_TASKS 100

typedef struct {
    _Atomic int hits[MAX_TASKS];
    _Atomic int bad_worker;
    _Atomic int per_worker[8];
    int n_threads;
    int sleep_us;  /* per task */
} job;

static void count_task(void *p, int task, int worker) {
    job *j = p;
    if (task < 0 || task >= MAX_TASKS || worker < 0 || worker >= j->n_threads) {
        atomic_fetch_add(&j->bad_worker, 1);
        return;
    }
    atomic_fetch_add(&j->hits[task], 1);
    atomic_fetch_add(&j->per_worker[worker], 1);
    if (j->sleep_us) {
        struct timespec ts = {0, j->sleep_us * 1000L};
        nanosleep(&ts, NULL);
    }
}

static void check_pool(eng_threadpool *tp, int n_threads, int rounds) {
    cr_assert_eq(eng_threadpool_size(tp), n_threads);
    static job j;
    for (int round = 0; round < rounds; round++) {
        for (int n = 0; n <= MAX_TASKS; n++) {
            memset(&j, 0, sizeof j);
            j.n_threads = n_threads;
            eng_threadpool_run(tp, count_task, &j, n);
            cr_assert_eq(atomic_load(&j.bad_worker), 0, "task or worker id out of range");
            for (int t = 0; t < MAX_TASKS; t++)
                cr_assert_eq(atomic_load(&j.hits[t]), t < n ? 1 : 0,
                             "pool %d, round %d, %d tasks: task %d ran %d times", n_threads, round,
                             n, t, atomic_load(&j.hits[t]));
        }
    }
}

Test(threadpool, null_pool_runs_inline) {
    check_pool(NULL, 1, 1);
}

Test(threadpool, every_task_once) {
    const int sizes[] = {1, 2, 3, 4, 7};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        eng_threadpool *tp = eng_threadpool_create(sizes[i]);
        cr_assert_not_null(tp);
        check_pool(tp, sizes[i], 20);
        eng_threadpool_destroy(tp);
    }
}

Test(threadpool, default_size_is_online_cores) {
    eng_threadpool *tp = eng_threadpool_create(0);
    cr_assert_not_null(tp);
    cr_assert_geq(eng_threadpool_size(tp), 1);
    check_pool(tp, eng_threadpool_size(tp), 2);
    eng_threadpool_destroy(tp);
}

/* Jobs after the workers fell asleep on the condition variable. */
Test(threadpool, wakes_sleeping_workers) {
    eng_threadpool *tp = eng_threadpool_create(3);
    cr_assert_not_null(tp);
    for (int i = 0; i < 5; i++) {
        struct timespec ts = {0, 5 * 1000 * 1000};  /* longer than the spin */
        nanosleep(&ts, NULL);
        check_pool(tp, 3, 1);
    }
    eng_threadpool_destroy(tp);
}

/* Slow tasks are shared: with 100 tasks of 1 ms a second thread takes some
 * (unless the machine never schedules it for 100 ms). */
Test(threadpool, work_is_shared) {
    eng_threadpool *tp = eng_threadpool_create(2);
    cr_assert_not_null(tp);
    static job j;
    memset(&j, 0, sizeof j);
    j.n_threads = 2;
    j.sleep_us = 1000;
    eng_threadpool_run(tp, count_task, &j, 100);
    cr_assert_eq(atomic_load(&j.per_worker[0]) + atomic_load(&j.per_worker[1]), 100);
    cr_assert_gt(atomic_load(&j.per_worker[1]), 0, "worker 1 took no task");
    cr_assert_gt(atomic_load(&j.per_worker[0]), 0, "the caller took no task");
    eng_threadpool_destroy(tp);
}

/* Create and destroy many pools, with and without jobs in between. */
Test(threadpool, create_destroy_cycles) {
    for (int i = 0; i < 50; i++) {
        eng_threadpool *tp = eng_threadpool_create(1 + i % 4);
        cr_assert_not_null(tp);
        if (i % 2)
            check_pool(tp, 1 + i % 4, 1);
        eng_threadpool_destroy(tp);
    }
    eng_threadpool_destroy(NULL);
}
