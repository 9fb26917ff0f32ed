# Cython declarations for distserve/router/http1.py (the engine client), used only by tools/bench_compiled.py:
# an experiment measuring the engine client compiled with C-level classes (attributes as struct fields, methods
# called directly) against the same code interpreted. Not built into distserve (docs/benchmarks.md says why).
cdef class _Deadlines
cdef class _Connection

cdef class Response:
    cdef public int status
    cdef public bytes _raw_head
    cdef public object _headers
    cdef public _Connection _conn
    cdef public object _chunks
    cdef public Py_ssize_t _size
    cdef public object _waiter
    cdef public object _head
    cdef public bint _done
    cdef public object _error
    cdef public object _loop
    cdef public bint _paused
    cdef public object _slot
    cdef public _Deadlines _deadlines
    cdef public bint _whole
    cdef public object _idle_timer
    cdef public double _idle
    cdef public double _wait_since
    cdef public object _on_end
    cdef public object _relay
    cpdef _feed(self, bytes data)
    cpdef _finish(self)
    cpdef _complete(self, bytes body)
    cpdef _fail(self, exc)
    cpdef _wake(self)
    cpdef bytes _take(self)
    cpdef _stop_timers(self)

cdef class _Deadlines:
    cdef public object loop
    cdef public dict slots
    cdef public dict timers
    cdef public double _lo
    cdef public double _hi
    cdef public set _set
    cdef public object _key
    cdef public double _lo2
    cdef public double _hi2
    cdef public set _set2
    cdef public object _key2
    cpdef add(self, object resp, double deadline)
    cpdef remove(self, object resp)

cdef class _Connection:
    cdef public object pool
    cdef public object key
    cdef public object transport
    cdef public bint alive
    cdef public double idle_since
    cdef public object _loop
    cdef public bytearray _buf
    cdef public Response _resp
    cdef public int _state
    cdef public Py_ssize_t _remaining
    cdef public bint _keep_alive
    cdef public bint _got_bytes
    cdef public object _call
    cdef public bint reading_paused
    cpdef Response start(self, bytes request)
    cpdef abort(self)
    cpdef _release(self)
    cpdef _parse(self, Response resp, bytes data)
    cpdef _end(self, Response resp)
    cpdef bytes _whole_chunks(self, Response resp, bytes data)
    cpdef bint _head(self, Response resp, bytes head) except? 0
