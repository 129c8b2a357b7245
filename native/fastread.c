/* Batched positional reads for edgeinfer's storage layer.
 *
 * Python pays tens of microseconds per read call; a token's batch of neuron
 * reads is hundreds of calls. This loop issues them from C, on a few pthreads
 * pulling work from a shared counter, and reports per request how many bytes
 * arrived (or -errno). Retrying, error messages and accounting stay in Python:
 * a request that comes back short is simply redone there.
 *
 * Built at first use by native/loader.py: cc -O2 -shared -fPIC -pthread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define EI_MAX_THREADS 64

typedef struct {
    int fd;
    int64_t n;
    const int64_t *offsets;
    const int64_t *lengths;
    const uint64_t *dests;
    int64_t align;
    int64_t *status;
    int64_t *calls;
    int64_t next;
} ei_batch;

/* Read request i fully. After a short read, continue from the last aligned
 * point (O_DIRECT needs aligned offsets, lengths and addresses); stop at EOF
 * or when a read makes no progress. */
static void ei_read_one(ei_batch *b, int64_t i)
{
    char *dst = (char *)(uintptr_t)b->dests[i];
    int64_t off = b->offsets[i], len = b->lengths[i], done = 0, calls = 0;
    while (done < len) {
        int64_t start = done - done % b->align;
        ssize_t r = pread(b->fd, dst + start, (size_t)(len - start), (off_t)(off + start));
        calls++;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            b->status[i] = -(int64_t)errno;
            b->calls[i] = calls;
            return;
        }
        if (start + r <= done)
            break;
        done = start + r;
    }
    b->status[i] = done;
    b->calls[i] = calls;
}

static void *ei_worker(void *arg)
{
    ei_batch *b = (ei_batch *)arg;
    for (;;) {
        int64_t i = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        if (i >= b->n)
            return NULL;
        ei_read_one(b, i);
    }
}

/* Read n requests (offsets[i], lengths[i]) of fd into dests[i] on up to
 * nthreads threads (the caller's thread is one of them). status[i] receives
 * the bytes read (fewer than lengths[i] at EOF) or -errno; calls[i] the
 * number of pread calls. Returns the number of threads used. */
int ei_pread_batch(int fd, int64_t n, const int64_t *offsets, const int64_t *lengths,
                   const uint64_t *dests, int64_t align, int nthreads,
                   int64_t *status, int64_t *calls)
{
    pthread_t tid[EI_MAX_THREADS];
    ei_batch b = {fd, n, offsets, lengths, dests, align > 0 ? align : 1,
                  status, calls, 0};
    int started = 0;
    if (nthreads > EI_MAX_THREADS)
        nthreads = EI_MAX_THREADS;
    if (nthreads > n)
        nthreads = (int)n;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&tid[started], NULL, ei_worker, &b) != 0)
            break;  /* fewer threads is still correct */
        started++;
    }
    ei_worker(&b);
    for (int t = 0; t < started; t++)
        pthread_join(tid[t], NULL);
    return started + 1;
}

/* n copies src[i] -> dst[i] of len[i] bytes: staging buffer to destination. */
void ei_copy_batch(int64_t n, const uint64_t *src, const uint64_t *dst, const int64_t *len)
{
    for (int64_t i = 0; i < n; i++)
        memcpy((void *)(uintptr_t)dst[i], (const void *)(uintptr_t)src[i], (size_t)len[i]);
}

/* ---- io_uring: one thread keeps a queue of reads in flight --------------------
 *
 * Small random O_DIRECT reads are latency-bound: throughput grows with the number
 * in flight (this machine's virtio disk, 8 KiB reads: 29k/s at 16 in flight, 55-60k/s
 * at 64-256). Threads blocked in pread get there too, but a batch per layer per
 * token would create and join dozens of threads; a ring reaches that depth from
 * the caller's thread. Raw syscalls (no liburing): the kernel headers suffice.
 * Where io_uring is missing or refused, ei_ring_open returns NULL and the caller
 * keeps ei_pread_batch.
 */
#if defined(__linux__) && defined(__has_include)
#if __has_include(<linux/io_uring.h>)
#define EI_HAVE_URING 1
#endif
#endif

#ifdef EI_HAVE_URING
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/io_uring.h>

typedef struct {
    int fd;
    unsigned entries;
    unsigned *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_len, cq_len, sqes_len;
} ei_ring;

void ei_ring_close(void *handle)
{
    ei_ring *r = handle;
    if (!r)
        return;
    if (r->sqes)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_ptr && r->cq_ptr != r->sq_ptr)
        munmap(r->cq_ptr, r->cq_len);
    if (r->sq_ptr)
        munmap(r->sq_ptr, r->sq_len);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}

static void *ei_map(ei_ring *r, size_t len, off_t what)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, what);
    return p == MAP_FAILED ? NULL : p;
}

/* A ring of `entries` (rounded up to a power of two by the kernel), or NULL. */
void *ei_ring_open(unsigned entries)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    ei_ring *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0) {
        free(r);
        return NULL;
    }
    r->entries = p.sq_entries;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) {
        if (r->cq_len > r->sq_len)
            r->sq_len = r->cq_len;
        r->cq_len = r->sq_len;
    }
    r->sq_ptr = ei_map(r, r->sq_len, IORING_OFF_SQ_RING);
    r->cq_ptr = single ? r->sq_ptr : (r->sq_ptr ? ei_map(r, r->cq_len, IORING_OFF_CQ_RING) : NULL);
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = r->cq_ptr ? ei_map(r, r->sqes_len, IORING_OFF_SQES) : NULL;
    if (!r->sqes) {
        ei_ring_close(r);
        return NULL;
    }
    char *sq = r->sq_ptr, *cq = r->cq_ptr;
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return r;
}

/* Queue the rest of request i, from the last aligned point of what has arrived
 * (status[i] bytes; O_DIRECT needs aligned offsets, lengths and addresses). */
static void ei_ring_queue(ei_ring *r, int fd, int64_t i, const int64_t *offsets,
                          const int64_t *lengths, const uint64_t *dests, int64_t align,
                          const int64_t *status)
{
    int64_t start = status[i] - status[i] % align;
    unsigned tail = *r->sq_tail;
    unsigned idx = tail & *r->sq_mask;
    struct io_uring_sqe *s = &r->sqes[idx];
    memset(s, 0, sizeof *s);
    s->opcode = IORING_OP_READ;
    s->fd = fd;
    s->addr = dests[i] + (uint64_t)start;
    s->len = (unsigned)(lengths[i] - start);
    s->off = (uint64_t)(offsets[i] + start);
    s->user_data = (uint64_t)i;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

/* The contract of ei_pread_batch, with up to the ring's size of reads in flight from
 * this thread. Returns 0, or -errno when io_uring_enter itself fails (the caller then
 * redoes the batch with ei_pread_batch; reads already done are simply repeated). */
int ei_ring_batch(void *handle, int fd, int64_t n, const int64_t *offsets,
                  const int64_t *lengths, const uint64_t *dests, int64_t align,
                  int64_t *status, int64_t *calls)
{
    ei_ring *r = handle;
    int64_t next = 0, inflight = 0, finished = 0;
    unsigned pending = 0;           /* queued, not yet submitted */
    if (align < 1)
        align = 1;
    for (int64_t i = 0; i < n; i++)
        status[i] = calls[i] = 0;
    while (finished < n) {
        while (next < n && inflight < (int64_t)r->entries) {
            ei_ring_queue(r, fd, next, offsets, lengths, dests, align, status);
            calls[next++]++;
            inflight++;
            pending++;
        }
        int ret;
        do {
            ret = (int)syscall(__NR_io_uring_enter, r->fd, pending, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        } while (ret < 0 && errno == EINTR);
        if (ret < 0)
            return -errno;
        if (ret == 0 && pending == inflight && pending > 0)
            return -EBUSY;          /* nothing could be submitted: never wait forever */
        pending -= (unsigned)ret;
        unsigned head = *r->cq_head;
        unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
            int64_t i = (int64_t)c->user_data;
            int64_t start = status[i] - status[i] % align;   /* where this read began */
            int res = c->res;
            inflight--;
            if (res == -EINTR || res == -EAGAIN) {
                res = 0;            /* not progress, not an error: queue it again */
            } else if (res < 0) {
                status[i] = res;
                finished++;
                continue;
            } else if (res == 0 || start + res <= status[i]) {
                finished++;         /* EOF or no progress: short, the caller decides */
                continue;
            }
            status[i] = start + res;
            if (status[i] >= lengths[i]) {
                finished++;
                continue;
            }
            ei_ring_queue(r, fd, i, offsets, lengths, dests, align, status);
            calls[i]++;
            inflight++;
            pending++;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
    return 0;
}
#else
void *ei_ring_open(unsigned entries)
{
    (void)entries;
    return NULL;
}

void ei_ring_close(void *handle)
{
    (void)handle;
}

int ei_ring_batch(void *handle, int fd, int64_t n, const int64_t *offsets,
                  const int64_t *lengths, const uint64_t *dests, int64_t align,
                  int64_t *status, int64_t *calls)
{
    (void)handle; (void)fd; (void)n; (void)offsets; (void)lengths; (void)dests;
    (void)align; (void)status; (void)calls;
    return -ENOSYS;
}
#endif

int ei_abi_version(void)
{
    return 2;
}
