/*
 * Thin helpers over liburing for nbd_uring.engine.ring.
 *
 * liburing's prep functions and CQE iteration are static inline or macros, so Python cannot
 * call them through cffi directly; each helper here does one whole step (get an SQE, prepare
 * it, tag it) so the Python side pays one foreign call per request and one per reaped batch.
 * Every function returns >= 0 or -errno and never touches errno or prints.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <liburing.h>

#include "nbdu.h"
#include "nbdu_internal.h"

struct nbdu_ring {
    struct io_uring ring;
    struct io_uring_probe *probe;
    int deferred; /* IORING_SETUP_DEFER_TASKRUN: completions wait for io_uring_enter */
    struct nbdu_lane *lane; /* its completions are handled in C while reaping */
};

struct io_uring *nbdu_ring_uring(struct nbdu_ring *r)
{
    return &r->ring;
}

void nbdu_ring_set_lane(struct nbdu_ring *r, struct nbdu_lane *lane)
{
    r->lane = lane;
}

struct nbdu_ring *nbdu_ring_new(unsigned entries, unsigned flags, int *err)
{
    /* flags: 1 asks for one issuer with deferred task work (kernel 6.1+): completions
     * from io-wq are then posted in batches by this thread instead of one by one by the
     * workers. Older kernels refuse the flags; the ring is then set up without them. */
    static const unsigned tries[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
        IORING_SETUP_SINGLE_ISSUER,
        0,
    };
    struct nbdu_ring *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        *err = -ENOMEM;
        return NULL;
    }
    int rc = -EINVAL;
    for (unsigned i = (flags & 1) ? 0 : 2; i < sizeof(tries) / sizeof(tries[0]); i++) {
        rc = io_uring_queue_init(entries, &r->ring, tries[i]);
        if (rc != -EINVAL)
            break;
    }
    if (rc < 0) {
        free(r);
        *err = rc;
        return NULL;
    }
    r->deferred = (r->ring.flags & IORING_SETUP_DEFER_TASKRUN) != 0;
    r->probe = io_uring_get_probe_ring(&r->ring);
    *err = 0;
    return r;
}

void nbdu_ring_free(struct nbdu_ring *r)
{
    if (r == NULL)
        return;
    if (r->probe != NULL)
        io_uring_free_probe(r->probe);
    io_uring_queue_exit(&r->ring);
    free(r);
}

int nbdu_register_eventfd(struct nbdu_ring *r, int efd, int async_only)
{
    /* async_only: completions posted inside io_uring_enter() are reaped by the submitter
     * right away, so only those that finish later need to wake the event loop. */
    if (async_only)
        return io_uring_register_eventfd_async(&r->ring, efd);
    return io_uring_register_eventfd(&r->ring, efd);
}

int nbdu_eventfd_enable(struct nbdu_ring *r, int enabled)
{
    /* Completions posted while disabled do not signal the eventfd: the submitter turns it
     * off while it reaps itself, so inline completions cost no eventfd write and read. */
    return io_uring_cq_eventfd_toggle(&r->ring, enabled != 0);
}

unsigned nbdu_cq_ready(struct nbdu_ring *r)
{
    return io_uring_cq_ready(&r->ring);
}

unsigned nbdu_cq_entries(struct nbdu_ring *r)
{
    return r->ring.cq.ring_entries;
}

unsigned nbdu_sq_entries(struct nbdu_ring *r)
{
    return r->ring.sq.ring_entries;
}

int nbdu_opcode_supported(struct nbdu_ring *r, int op)
{
    if (r->probe == NULL)
        return 0;
    return io_uring_opcode_supported(r->probe, op);
}

int nbdu_prep_read(struct nbdu_ring *r, int fd, void *buf, unsigned len, uint64_t off,
                   uint64_t user_data)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_read(sqe, fd, buf, len, off);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int nbdu_prep_write(struct nbdu_ring *r, int fd, const void *buf, unsigned len, uint64_t off,
                    uint64_t user_data, int rw_flags)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_write(sqe, fd, buf, len, off);
    sqe->rw_flags = rw_flags;
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int nbdu_prep_write_linked_fsync(struct nbdu_ring *r, int fd, const void *buf, unsigned len,
                                 uint64_t off, uint64_t write_user_data,
                                 uint64_t fsync_user_data)
{
    /* Both entries or neither: a link cannot span two submissions. */
    if (io_uring_sq_space_left(&r->ring) < 2)
        return -EBUSY;
    struct io_uring_sqe *w = io_uring_get_sqe(&r->ring);
    struct io_uring_sqe *s = io_uring_get_sqe(&r->ring);
    io_uring_prep_write(w, fd, buf, len, off);
    io_uring_sqe_set_data64(w, write_user_data);
    w->flags |= IOSQE_IO_LINK;
    io_uring_prep_fsync(s, fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(s, fsync_user_data);
    return 0;
}

int nbdu_prep_fsync(struct nbdu_ring *r, int fd, unsigned fsync_flags, uint64_t user_data)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_fsync(sqe, fd, fsync_flags);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int nbdu_prep_fallocate(struct nbdu_ring *r, int fd, int mode, uint64_t off, uint64_t len,
                        uint64_t user_data)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_fallocate(sqe, fd, mode, (off_t)off, (off_t)len);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int nbdu_prep_fadvise(struct nbdu_ring *r, int fd, uint64_t off, unsigned len, int advice,
                      uint64_t user_data)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (sqe == NULL)
        return -EBUSY;
    io_uring_prep_fadvise(sqe, fd, off, (off_t)len, advice);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int nbdu_prep_timeout(struct nbdu_ring *r, struct __kernel_timespec *ts, uint64_t ns,
                      uint64_t user_data)
{
    /* ts must stay valid until submitted: the caller keeps it with the operation. */
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (sqe == NULL)
        return -EBUSY;
    ts->tv_sec = (long long)(ns / 1000000000u);
    ts->tv_nsec = (long long)(ns % 1000000000u);
    io_uring_prep_timeout(sqe, ts, 0, 0);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int nbdu_submit(struct nbdu_ring *r)
{
    /* With deferred task work, the same system call also posts what has completed. */
    if (r->deferred)
        return io_uring_submit_and_get_events(&r->ring);
    return io_uring_submit(&r->ring);
}

int nbdu_get_events(struct nbdu_ring *r)
{
    if (!r->deferred)
        return 0;
    return io_uring_get_events(&r->ring);
}

int nbdu_work_pending(struct nbdu_ring *r)
{
    /* Completions queued as deferred task work, not posted yet (the kernel sets the flag
     * when the first one is queued, whether or not the eventfd was signalled). A hint only:
     * the flag may stay set after the work has run, so callers must not loop on it. */
    if (!r->deferred)
        return 0;
    return (IO_URING_READ_ONCE(*r->ring.sq.kflags) & IORING_SQ_TASKRUN) != 0;
}

int nbdu_deferred(struct nbdu_ring *r)
{
    return r->deferred;
}

int nbdu_reap(struct nbdu_ring *r, uint64_t *user_data, int32_t *res, unsigned max,
              unsigned *lane_done)
{
    /* Completions of the lane are finished here; the others are copied out for Python.
     * Stops when `max` have been copied (max 0: at the first that is not the lane's) or the
     * queue is empty. */
    struct io_uring_cqe *cqe;
    unsigned head;
    unsigned n = 0;
    unsigned seen = 0;
    unsigned lane = 0;

    io_uring_for_each_cqe(&r->ring, head, cqe) {
        uint64_t ud = io_uring_cqe_get_data64(cqe);
        if (ud & NBDU_LANE_BIT) {
            if (r->lane != NULL) /* else the lane gave up on it at close: its memory leaks */
                nbdu_lane_complete(r->lane, ud, cqe->res);
            lane++;
        } else {
            if (n == max)
                break;
            user_data[n] = ud;
            res[n] = cqe->res;
            n++;
        }
        seen++;
    }
    io_uring_cq_advance(&r->ring, seen);
    *lane_done = lane;
    return (int)n;
}
