#define _GNU_SOURCE /* SEEK_HOLE */
/*
 * The lane: plain NBD_CMD_READs and WRITEs handled in C from the request header to the reply.
 *
 * A READ or WRITE with compact headers, no flags, in bounds and aligned (a WRITE with its
 * whole payload already received; a structured READ of 64 KiB or more only over a range
 * without holes) is parsed, given a buffer, prepared as an SQE, completed and turned into a
 * reply (simple, or one OFFSET_DATA chunk) here, and sent with the connection's other lane
 * replies in one sendmsg. Python sees such a request only if it fails (to log it and answer
 * with an error reply) and calls in once per receive, per reap and per send.
 *
 * Ordering is the tracker's rule (a later request never overtakes an earlier one it
 * conflicts with): see nbdu_lane_feed for what the lane takes, and nbdu_lane_export_wait for
 * how Python's requests wait for the lane's. A FLUSH waits for the lane writes received
 * before it (nbdu_lane_export_flush_wait).
 *
 * Memory: buffers come from per-size-class free lists with a cap on what is kept idle;
 * every byte in flight is counted against the connection's budget, which Python also checks.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <liburing.h>

#include "nbdu.h"
#include "nbdu_internal.h"

#define LANE_BIT (1ULL << 63)
#define CLASS_MIN_SHIFT 12
#define CLASSES 9 /* 4 KiB .. 1 MiB */
#define LANE_MAX_LENGTH (1U << (CLASS_MIN_SHIFT + CLASSES - 1))
#define LANE_IOV_MAX 1024

#define NBD_REQUEST_MAGIC 0x25609513U
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698U
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efU
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_REPLY_FLAG_DONE 1
#define NBD_REPLY_TYPE_OFFSET_DATA 1

struct lane_slot {
    struct lane_slot *next; /* export's in-flight list, connection's reply queue, free list */
    struct lane_slot *prev; /* export's in-flight list only */
    struct nbdu_lane_conn *conn;
    struct nbdu_lane_export *exp;
    uint64_t cookie;
    uint64_t offset;
    uint64_t seq;     /* writes: the export's write sequence number */
    uint32_t length;
    uint32_t done;
    uint32_t datalen; /* payload bytes of the reply: the length for a read, 0 for a write */
    unsigned cls;
    unsigned hdrlen;
    int write;
    unsigned char *buf;
    unsigned char hdr[32];
};

enum { WAIT_EXCLUSIVE, WAIT_SHARED, WAIT_FLUSH };

struct lane_waiter {
    uint64_t start, end, token; /* WAIT_FLUSH: start is the last write sequence number */
    unsigned count;
    int kind; /* EXCLUSIVE: every overlapping lane op; SHARED: overlapping writes only */
};

struct nbdu_lane_export {
    struct nbdu_lane *lane;
    int fd;
    int closed;
    int writable;   /* the lane may take writes (Python decides: durability, read-only...) */
    uint64_t limit; /* I/O must end at or before this (the size, or a direct-I/O tail) */
    struct nbdu_lane_export_state st; /* shared with Python */
    unsigned refs;
    unsigned writes;    /* lane writes in flight */
    uint64_t write_seq;
    struct lane_slot *ops; /* lane reads and writes in flight, doubly linked */
    struct lane_waiter *waiters;
    unsigned nwaiters, capwaiters;
};

struct nbdu_lane_conn {
    struct nbdu_lane *lane;
    struct nbdu_lane_export *exp;
    uint64_t token;
    uint64_t size;
    uint64_t max_bytes;
    uint32_t max_block;
    uint32_t align_mask;
    uint32_t hole_check_from; /* 0: simple replies; else structured (one OFFSET_DATA chunk),
                               * and reads this long or longer only over a range of data */
    uint32_t max_requests;
    struct nbdu_lane_tally t; /* requests received and not fully replied to; Python reads it */
    int closed;
    int notified;
    unsigned refs;
    struct lane_slot *queue, *queue_tail; /* replies to send, oldest first */
    size_t sent;                          /* bytes of the queue's head already sent (t.partial) */
};

struct nbdu_lane {
    struct nbdu_ring *ring;
    unsigned *sqes_in_flight; /* shared with Python: lane + Python SQEs against the CQ size */
    unsigned cq_entries;
    unsigned inflight;
    unsigned prepared; /* SQEs prepared since Python last asked */
    unsigned failures; /* FAILED events queued: Python must answer them */
    void *free_bufs[CLASSES];
    size_t cached, max_cached;
    struct lane_slot *free_slots;
    struct nbdu_lane_event *events;
    unsigned nevents, capevents, events_head;
    unsigned nconns, nwaiters; /* with inflight: what may still push an event (room_for_one) */
};

static inline uint16_t be16(const unsigned char *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t be64(const unsigned char *p)
{
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

static inline void put16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static inline void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static inline void put64(unsigned char *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

/* -- the lane --------------------------------------------------------------------------- */

struct nbdu_lane *nbdu_lane_new(struct nbdu_ring *r, unsigned *sqes_in_flight, size_t max_cached)
{
    struct nbdu_lane *lane = calloc(1, sizeof(*lane));
    if (lane == NULL)
        return NULL;
    lane->ring = r;
    lane->sqes_in_flight = sqes_in_flight;
    lane->cq_entries = nbdu_cq_entries(r);
    lane->max_cached = max_cached;
    nbdu_ring_set_lane(r, lane);
    return lane;
}

void nbdu_lane_free(struct nbdu_lane *lane)
{
    /* Only once nothing is in flight (the ring is closed, or was drained). */
    if (lane == NULL)
        return;
    nbdu_lane_detach(lane);
    for (unsigned c = 0; c < CLASSES; c++) {
        void *b = lane->free_bufs[c];
        while (b != NULL) {
            void *next = *(void **)b;
            free(b);
            b = next;
        }
    }
    struct lane_slot *s = lane->free_slots;
    while (s != NULL) {
        struct lane_slot *next = s->next;
        free(s);
        s = next;
    }
    free(lane->events);
    free(lane);
}

void nbdu_lane_detach(struct nbdu_lane *lane)
{
    /* The ring is going away; nothing of the lane may touch it from here on. */
    if (lane->ring != NULL)
        nbdu_ring_set_lane(lane->ring, NULL);
    lane->ring = NULL;
}

unsigned nbdu_lane_inflight(struct nbdu_lane *lane)
{
    return lane->inflight;
}

unsigned nbdu_lane_take_prepared(struct nbdu_lane *lane)
{
    unsigned n = lane->prepared;
    lane->prepared = 0;
    return n;
}

static void conn_unref(struct nbdu_lane_conn *c);
static void export_unref(struct nbdu_lane_export *e);

static void *grow(void *items, unsigned *cap, unsigned need, size_t size, unsigned first)
{
    /* items (of `size` bytes each) with room for at least `need`, or NULL (items unchanged). */
    if (need <= *cap)
        return items;
    unsigned n = *cap ? *cap : first;
    while (n < need)
        n *= 2;
    void *p = realloc(items, (size_t)n * size);
    if (p != NULL)
        *cap = n;
    return p;
}

static int room_for_one(struct nbdu_lane *lane)
{
    /* Before one more op in flight, waiter or connection: make sure the event it may push
     * (FAILED, READY, REPLIES) will fit, so that no event is ever lost to a failed
     * allocation once there is something to report. 0, or -ENOMEM (then do not add it). */
    unsigned need = lane->nevents + lane->inflight + lane->nwaiters + lane->nconns + 1;
    void *p = grow(lane->events, &lane->capevents, need, sizeof(*lane->events), 64);
    if (p == NULL)
        return -ENOMEM;
    lane->events = p;
    return 0;
}

static void push_event(struct nbdu_lane *lane, const struct nbdu_lane_event *ev)
{
    /* room_for_one has made room for it. */
    lane->events[lane->nevents++] = *ev;
}

unsigned nbdu_lane_events(struct nbdu_lane *lane, struct nbdu_lane_event *out, unsigned max)
{
    unsigned n = 0;
    while (n < max && lane->events_head < lane->nevents) {
        struct nbdu_lane_event *ev = &lane->events[lane->events_head++];
        out[n++] = *ev;
        if (ev->kind == NBDU_LANE_FAILED)
            lane->failures--;
        if (ev->kind == NBDU_LANE_REPLIES) {
            ev->conn->notified = 0;
            conn_unref(ev->conn); /* the event's reference, so the pointer stayed valid */
        }
    }
    if (lane->events_head == lane->nevents)
        lane->events_head = lane->nevents = 0;
    return n;
}

unsigned nbdu_lane_pending_events(struct nbdu_lane *lane)
{
    return lane->nevents - lane->events_head;
}

static unsigned char *buf_get(struct nbdu_lane *lane, uint32_t length, unsigned *cls_out)
{
    unsigned cls = 0;
    while ((1U << (CLASS_MIN_SHIFT + cls)) < length)
        cls++;
    *cls_out = cls;
    void *b = lane->free_bufs[cls];
    if (b != NULL) {
        lane->free_bufs[cls] = *(void **)b;
        lane->cached -= (size_t)1 << (CLASS_MIN_SHIFT + cls);
        return b;
    }
    return aligned_alloc(4096, (size_t)1 << (CLASS_MIN_SHIFT + cls));
}

static void buf_put(struct nbdu_lane *lane, unsigned char *b, unsigned cls)
{
    size_t size = (size_t)1 << (CLASS_MIN_SHIFT + cls);
    if (lane->cached + size > lane->max_cached) {
        free(b);
        return;
    }
    *(void **)b = lane->free_bufs[cls];
    lane->free_bufs[cls] = b;
    lane->cached += size;
}

static void slot_put(struct nbdu_lane *lane, struct lane_slot *s)
{
    s->next = lane->free_slots;
    lane->free_slots = s;
}

static struct lane_slot *slot_get(struct nbdu_lane *lane)
{
    struct lane_slot *s = lane->free_slots;
    if (s != NULL) {
        lane->free_slots = s->next;
        return s;
    }
    return malloc(sizeof(*s));
}

/* A slot whose reply is sent, or whose connection is gone: give back its buffer and budget. */
static void slot_retire(struct nbdu_lane *lane, struct lane_slot *s)
{
    struct nbdu_lane_conn *c = s->conn;
    if (s->buf != NULL)
        buf_put(lane, s->buf, s->cls);
    c->t.bytes -= s->length;
    c->t.requests--;
    slot_put(lane, s);
    conn_unref(c);
}

/* -- exports ---------------------------------------------------------------------------- */

struct nbdu_lane_export *nbdu_lane_export_new(struct nbdu_lane *lane, int fd, uint64_t limit,
                                              int writable)
{
    struct nbdu_lane_export *e = calloc(1, sizeof(*e));
    if (e == NULL)
        return NULL;
    e->lane = lane;
    e->fd = fd;
    e->limit = limit;
    e->writable = writable;
    e->refs = 1;
    return e;
}

void nbdu_lane_export_close(struct nbdu_lane_export *e)
{
    e->closed = 1;
    export_unref(e);
}

static void export_unref(struct nbdu_lane_export *e)
{
    if (--e->refs == 0) {
        free(e->waiters);
        free(e);
    }
}

static int overlaps(struct nbdu_lane_export *e, uint64_t start, uint64_t end, int writes_only)
{
    for (struct lane_slot *s = e->ops; s != NULL; s = s->next)
        if ((s->write || !writes_only) && s->offset < end && start < s->offset + s->length)
            return 1;
    return 0;
}

static int add_waiter(struct nbdu_lane_export *e, struct lane_waiter w)
{
    void *p = grow(e->waiters, &e->capwaiters, e->nwaiters + 1, sizeof(*e->waiters), 8);
    if (p == NULL || room_for_one(e->lane) < 0)
        return -ENOMEM;
    e->waiters = p;
    e->waiters[e->nwaiters++] = w;
    e->lane->nwaiters++;
    return (int)w.count;
}

int nbdu_lane_export_wait(struct nbdu_lane_export *e, uint64_t start, uint64_t end,
                          int exclusive, uint64_t token)
{
    /* A request Python admits for [start, end) must wait for the lane ops in flight that
     * conflict with it (every overlapping one if it writes, overlapping writes if it reads):
     * returns how many; if any, an event with `token` comes once the last has completed.
     * The lane takes nothing that would conflict with it meanwhile: Python has already set
     * st.python_active (no lane write) and, if it writes, st.exclusive (no lane read). */
    unsigned count = 0;
    for (struct lane_slot *s = e->ops; s != NULL; s = s->next)
        if ((exclusive || s->write) && s->offset < end && start < s->offset + s->length)
            count++;
    if (count == 0)
        return 0;
    return add_waiter(e, (struct lane_waiter){start, end, token, count,
                                              exclusive ? WAIT_EXCLUSIVE : WAIT_SHARED});
}

int nbdu_lane_export_flush_wait(struct nbdu_lane_export *e, uint64_t token)
{
    /* A FLUSH waits for the lane writes received before it: returns how many are in flight;
     * if any, an event with `token` comes once they have completed (later ones not waited). */
    if (e->writes == 0)
        return 0;
    return add_waiter(e, (struct lane_waiter){e->write_seq, 0, token, e->writes, WAIT_FLUSH});
}

static void export_op_done(struct nbdu_lane *lane, struct lane_slot *s)
{
    struct nbdu_lane_export *e = s->exp;
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        e->ops = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    s->next = s->prev = NULL;
    e->st.inflight--;
    if (s->write)
        e->writes--;
    uint64_t end = s->offset + s->length;
    for (unsigned i = 0; i < e->nwaiters;) {
        struct lane_waiter *w = &e->waiters[i];
        int counts;
        if (w->kind == WAIT_FLUSH)
            counts = s->write && s->seq <= w->start;
        else
            counts = (w->kind == WAIT_EXCLUSIVE || s->write) && w->start < end &&
                     s->offset < w->end;
        if (counts && --w->count == 0) {
            struct nbdu_lane_event ev = {.kind = NBDU_LANE_READY, .token = w->token};
            push_event(lane, &ev);
            e->waiters[i] = e->waiters[--e->nwaiters];
            lane->nwaiters--;
            continue;
        }
        i++;
    }
    export_unref(e);
}

/* -- connections ------------------------------------------------------------------------ */

struct nbdu_lane_conn *nbdu_lane_conn_new(struct nbdu_lane *lane, struct nbdu_lane_export *e,
                                          uint64_t token, uint64_t size, uint32_t max_block,
                                          uint32_t align_mask, uint32_t hole_check_from,
                                          uint64_t max_bytes, uint32_t max_requests)
{
    if (room_for_one(lane) < 0)
        return NULL;
    struct nbdu_lane_conn *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    lane->nconns++;
    c->lane = lane;
    c->exp = e;
    e->refs++;
    c->token = token;
    c->size = size;
    c->max_block = max_block < LANE_MAX_LENGTH ? max_block : LANE_MAX_LENGTH;
    c->align_mask = align_mask;
    c->hole_check_from = hole_check_from;
    c->max_bytes = max_bytes;
    c->max_requests = max_requests;
    c->refs = 1;
    return c;
}

static void conn_unref(struct nbdu_lane_conn *c)
{
    if (--c->refs == 0) {
        export_unref(c->exp);
        free(c);
    }
}

void nbdu_lane_conn_close(struct nbdu_lane_conn *c)
{
    /* Replies not sent are dropped; reads still in flight are retired as they complete. */
    c->closed = 1;
    c->lane->nconns--;
    struct lane_slot *s = c->queue;
    c->queue = c->queue_tail = NULL;
    c->sent = 0;
    c->t.partial = 0;
    while (s != NULL) {
        struct lane_slot *next = s->next;
        slot_retire(c->lane, s); /* drops the slot's reference; Python's is still held */
        s = next;
    }
    conn_unref(c);
}



struct nbdu_lane_tally *nbdu_lane_conn_tally(struct nbdu_lane_conn *c)
{
    return &c->t;
}

struct nbdu_lane_export_state *nbdu_lane_export_state(struct nbdu_lane_export *e)
{
    return &e->st;
}


static int prep_slot(struct nbdu_lane *lane, struct lane_slot *s)
{
    struct io_uring *ring = nbdu_ring_uring(lane->ring);
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (sqe == NULL) {
        int rc = io_uring_submit(ring);
        if (rc < 0)
            return rc;
        sqe = io_uring_get_sqe(ring);
        if (sqe == NULL)
            return -EBUSY;
    }
    if (s->write)
        io_uring_prep_write(sqe, s->exp->fd, s->buf + s->done, s->length - s->done,
                            s->offset + s->done);
    else
        io_uring_prep_read(sqe, s->exp->fd, s->buf + s->done, s->length - s->done,
                           s->offset + s->done);
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)s | LANE_BIT);
    lane->inflight++;
    (*lane->sqes_in_flight)++;
    lane->prepared++;
    return 0;
}

static int all_data(struct nbdu_lane_export *e, uint64_t offset, uint32_t length)
{
    /* Whether the range has no hole, so one OFFSET_DATA chunk is the whole structured reply
     * (a range with holes goes to Python, which sends OFFSET_HOLE chunks for them). One
     * lseek: the layout cannot change before the read, since nothing that writes is admitted
     * while the lane takes reads. A file system that cannot tell has no holes, as in Python. */
    off_t hole = lseek(e->fd, (off_t)offset, SEEK_HOLE);
    if (hole < 0)
        return errno != ENXIO;
    return (uint64_t)hole >= offset + length;
}

int nbdu_lane_feed(struct nbdu_lane_conn *c, const unsigned char *data, size_t pos, size_t end,
                   uint64_t other_bytes, unsigned other_requests, size_t *pos_out)
{
    /* Take the plain READs and WRITEs at data[pos:end] (a WRITE with its whole payload
     * there), stopping at the first request the lane does not take (Python's), at an
     * incomplete one, or when the budget or the ring is full. Returns how many were taken;
     * *pos_out is where the first one not taken starts.
     *
     * Ordering, as the tracker keeps it for Python's requests: a read conflicts with
     * writes, a write with everything, overlapping and earlier. A read is taken only while
     * Python has no write admitted (st.exclusive) and no lane write in flight overlaps it; a
     * write only while Python has nothing admitted (st.python_active) and no lane op in
     * flight overlaps it. Anything else goes to Python, whose tracker then makes it wait
     * for the lane ops it conflicts with (nbdu_lane_export_wait). */
    struct nbdu_lane *lane = c->lane;
    struct nbdu_lane_export *e = c->exp;
    int taken = 0;
    while (end - pos >= 28 && !c->closed && !e->closed) {
        const unsigned char *h = data + pos;
        if (be32(h) != NBD_REQUEST_MAGIC || be16(h + 4) != 0)
            break;
        unsigned command = be16(h + 6);
        if (command != NBD_CMD_READ && command != NBD_CMD_WRITE)
            break;
        uint64_t cookie = be64(h + 8);
        uint64_t offset = be64(h + 16);
        uint32_t length = be32(h + 24);
        if (length == 0 || length > c->max_block || offset > c->size ||
            length > c->size - offset || ((offset | length) & c->align_mask) ||
            offset + length > e->limit)
            break;
        int write = command == NBD_CMD_WRITE;
        size_t need = 28;
        if (write) {
            need += length;
            if (!e->writable || e->st.python_active || end - pos < need ||
                (e->st.inflight && overlaps(e, offset, offset + length, 0)))
                break;
        } else if (e->st.exclusive || (e->writes && overlaps(e, offset, offset + length, 1)) ||
                   (c->hole_check_from && length >= c->hole_check_from &&
                    !all_data(e, offset, length))) {
            break;
        }
        uint64_t bytes = c->t.bytes + other_bytes;
        if (c->t.requests + other_requests >= c->max_requests ||
            (bytes > 0 && bytes + length > c->max_bytes))
            break;
        if (*lane->sqes_in_flight + 1 > lane->cq_entries || room_for_one(lane) < 0)
            break;
        struct lane_slot *s = slot_get(lane);
        if (s == NULL)
            break;
        s->buf = buf_get(lane, length, &s->cls);
        if (s->buf == NULL) {
            slot_put(lane, s);
            break;
        }
        if (write)
            memcpy(s->buf, h + 28, length);
        s->conn = c;
        s->exp = e;
        s->cookie = cookie;
        s->offset = offset;
        s->length = length;
        s->datalen = write ? 0 : length;
        s->write = write;
        s->done = 0;
        s->prev = NULL;
        if (prep_slot(lane, s) < 0) {
            buf_put(lane, s->buf, s->cls);
            slot_put(lane, s);
            break;
        }
        if (write) {
            s->seq = ++e->write_seq;
            e->writes++;
        }
        s->next = e->ops;
        if (e->ops != NULL)
            e->ops->prev = s;
        e->ops = s;
        e->st.inflight++;
        e->refs++;
        c->refs++;
        c->t.bytes += length;
        c->t.requests++;
        pos += need;
        taken++;
    }
    *pos_out = pos;
    return taken;
}

static void queue_reply(struct nbdu_lane *lane, struct lane_slot *s)
{
    struct nbdu_lane_conn *c = s->conn;
    unsigned char *h = s->hdr;
    if (s->write) {
        /* Written: the payload buffer can go now. A simple reply, which structured replies
         * allow for a success without payload. */
        buf_put(lane, s->buf, s->cls);
        s->buf = NULL;
        put32(h, NBD_SIMPLE_REPLY_MAGIC);
        put32(h + 4, 0);
        put64(h + 8, s->cookie);
        s->hdrlen = 16;
    } else if (c->hole_check_from) { /* structured replies */
        put32(h, NBD_STRUCTURED_REPLY_MAGIC);
        put16(h + 4, NBD_REPLY_FLAG_DONE);
        put16(h + 6, NBD_REPLY_TYPE_OFFSET_DATA);
        put64(h + 8, s->cookie);
        put32(h + 16, s->length + 8);
        put64(h + 20, s->offset);
        s->hdrlen = 28;
    } else {
        put32(h, NBD_SIMPLE_REPLY_MAGIC);
        put32(h + 4, 0);
        put64(h + 8, s->cookie);
        s->hdrlen = 16;
    }
    s->next = NULL;
    if (c->queue_tail != NULL)
        c->queue_tail->next = s;
    else
        c->queue = s;
    c->queue_tail = s;
    if (!c->notified) {
        c->notified = 1;
        struct nbdu_lane_event ev = {.kind = NBDU_LANE_REPLIES, .token = c->token, .conn = c};
        push_event(lane, &ev);
        c->refs++;
    }
}

/* One CQE of a lane read; called by nbdu_reap. */
void nbdu_lane_complete(struct nbdu_lane *lane, uint64_t user_data, int32_t res)
{
    struct lane_slot *s = (struct lane_slot *)(uintptr_t)(user_data & ~LANE_BIT);
    lane->inflight--;
    (*lane->sqes_in_flight)--;
    if (res > 0 && s->done + (uint32_t)res < s->length) {
        s->done += (uint32_t)res; /* short read or write: the rest */
        if (prep_slot(lane, s) == 0)
            return;
        res = -EIO;
    }
    export_op_done(lane, s);
    struct nbdu_lane_conn *c = s->conn;
    if (res == 0)
        res = -EIO; /* end of file inside the export: nothing more would come */
    if (res < 0 || c->closed) {
        if (res < 0 && !c->closed) {
            struct nbdu_lane_event ev = {
                .kind = NBDU_LANE_FAILED, .token = c->token, .cookie = s->cookie,
                .offset = s->offset, .length = s->length, .err = -res,
                .command = s->write ? NBD_CMD_WRITE : NBD_CMD_READ,
            };
            push_event(lane, &ev);
            lane->failures++;
        }
        slot_retire(lane, s);
        return;
    }
    queue_reply(lane, s);
}

int nbdu_lane_send(struct nbdu_lane_conn *c, int fd)
{
    /* Send queued replies until the queue is empty (1), the socket is full (0), or an error
     * (-errno). A reply partly sent is finished before anything else goes on the socket. */
    struct iovec iov[LANE_IOV_MAX];
    while (c->queue != NULL) {
        unsigned n = 0;
        size_t skip = c->sent;
        for (struct lane_slot *s = c->queue; s != NULL && n + 2 <= LANE_IOV_MAX; s = s->next) {
            if (skip < s->hdrlen) {
                iov[n].iov_base = s->hdr + skip;
                iov[n].iov_len = s->hdrlen - skip;
                n++;
                if (s->datalen) {
                    iov[n].iov_base = s->buf;
                    iov[n].iov_len = s->datalen;
                    n++;
                }
            } else {
                iov[n].iov_base = s->buf + (skip - s->hdrlen);
                iov[n].iov_len = s->datalen - (skip - s->hdrlen);
                n++;
            }
            skip = 0;
        }
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = n};
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            return -errno;
        }
        size_t left = (size_t)sent + c->sent;
        c->sent = 0;
        c->t.partial = 0;
        while (c->queue != NULL) {
            struct lane_slot *s = c->queue;
            size_t whole = s->hdrlen + s->datalen;
            if (left < whole) {
                c->sent = left;
                c->t.partial = left != 0;
                break;
            }
            left -= whole;
            c->queue = s->next;
            if (c->queue == NULL)
                c->queue_tail = NULL;
            slot_retire(c->lane, s);
        }
        if (c->sent)
            return 0; /* the socket took part of a reply: it is full */
    }
    return 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int nbdu_lane_serve(struct nbdu_lane_conn *c, int fd, unsigned char *buf, size_t cap,
                    size_t *end_io, uint64_t poll_ns, unsigned max_rounds)
{
    /* The connection's reader loop while its requests are all the lane's: take, submit,
     * reap, send, and receive the next ones (polling the socket up to poll_ns first: Python
     * passes 0 unless this is the only client), for at most max_rounds receives. buf[0:*end_io] holds what was received and not yet taken
     * (at most a partial header, or a request for Python). Returns NBDU_SERVE_IDLE (polled in
     * vain: wait for the socket), NBDU_SERVE_PYTHON (something needs Python: a request the
     * lane does not take, an event, a completion or requests still in flight, a full
     * socket), NBDU_SERVE_YIELD (the round limit: let the event loop run), NBDU_SERVE_EOF,
     * or -errno. *end_io is updated; data starts at 0. */
    struct nbdu_lane *lane = c->lane;
    struct nbdu_ring *r = lane->ring;
    size_t end = *end_io;
    int status = NBDU_SERVE_YIELD; /* unless something ends the loop earlier */

    nbdu_eventfd_enable(r, 0); /* completions reaped here need no wake-up */
    for (unsigned round = 0; round < max_rounds; round++) {
        size_t pos = 0;
        if (end >= 28) {
            nbdu_lane_feed(c, buf, 0, end, 0, 0, &pos);
            if (pos) {
                memmove(buf, buf + pos, end - pos);
                end -= pos;
            }
        }
        if (lane->prepared) {
            lane->prepared = 0;
            int rc = nbdu_submit(r);
            if (rc < 0) {
                status = rc;
                goto out;
            }
        }
        unsigned reaped;
        nbdu_reap(r, NULL, NULL, 0, &reaped); /* the lane's; what follows is Python's */
        int other = nbdu_cq_ready(r) != 0;
        if (c->queue != NULL) {
            int rc = nbdu_lane_send(c, fd);
            if (rc <= 0) {
                status = rc < 0 ? rc : NBDU_SERVE_PYTHON;
                goto out;
            }
        }
        if (end >= 28 || other || lane->failures || c->t.requests || c->closed) {
            status = NBDU_SERVE_PYTHON; /* a request it did not take, or something else */
            goto out;
        }
        uint64_t deadline = 0;
        for (;;) {
            ssize_t n = recv(fd, buf + end, cap - end, MSG_DONTWAIT);
            if (n > 0) {
                end += (size_t)n;
                break;
            }
            if (n == 0) {
                status = NBDU_SERVE_EOF;
                goto out;
            }
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                status = -errno;
                goto out;
            }
            if (poll_ns == 0) {
                status = NBDU_SERVE_IDLE;
                goto out;
            }
            uint64_t t = now_ns();
            if (deadline == 0)
                deadline = t + poll_ns;
            else if (t >= deadline) {
                status = NBDU_SERVE_IDLE;
                goto out;
            }
        }
    }
out:
    nbdu_eventfd_enable(r, 1);
    *end_io = end;
    return status;
}
