#!/usr/bin/perl

# Redis behind Sentinel: the gateways ask the sentinels where the master
# is (redis_sentinel=, redis_master=), and when the master dies under
# load the sentinels promote its replica and the gateways follow, with
# no reload: no request fails meanwhile (redis_fail=local decides while
# there is no master), the log says where the master went, and the
# status counts the failover.  Real redis-server, replica and three
# sentinels.

use strict;
use warnings;

use lib 't/lib';

use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;
my $dir = $t->testdir;

my $master = $t->start_redis;
my $replica = $t->start_redis;
$replica->cli('REPLICAOF', '127.0.0.1', $master->port);

# three sentinels, a quorum of two, a master down after a second
my @sentinel;
for my $n (1 .. 3) {
    my $port = $t->_anonymous_port;
    $t->write_file("sentinel$n.conf", <<"EOF");
port $port
bind 127.0.0.1
dir $dir
sentinel monitor mymaster 127.0.0.1 ${\ $master->port } 2
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 4000
sentinel parallel-syncs mymaster 1
EOF
    my $pid = Ratepool::Test::_spawn("$dir/sentinel$n.log",
        $ENV{RATEPOOL_REDIS_SERVER} // '/usr/bin/redis-server',
        "$dir/sentinel$n.conf", '--sentinel');
    push @sentinel, { port => $port, pid => $pid };
}

# whatever happens to the test, its sentinels go with it
END { kill KILL => $_->{pid} for @sentinel }

sub sentinel_cli {
    my ($s, @cmd) = @_;
    open my $fh, '-|', 'redis-cli', '-p', $s->{port}, @cmd or die $!;
    local $/;
    my $out = <$fh> // '';
    close $fh;
    return $out;
}

sub master_port {
    my ($port) = sentinel_cli($sentinel[0], 'SENTINEL',
        'get-master-addr-by-name', 'mymaster') =~ /^(\d+)$/m;
    return $port // 0;
}

# ready: each sentinel knows the replica, and the replica has synced
my $deadline = time + 15;
until (time > $deadline
       || (!grep({ sentinel_cli($_, 'SENTINEL', 'replicas', 'mymaster')
                   !~ /\d/ } @sentinel)
           && $replica->cli('INFO', 'replication')
              =~ /master_link_status:up/))
{
    sleep 0.2;
}
is(master_port(), $master->port, 'the sentinels watch the master');

my $KEY = 'sk-ant-mock-m1-' . Ratepool::Test::random_hex(8);
my $TOKEN = 'gw-sentinel-' . Ratepool::Test::random_hex(8);
my $mock = $t->start_mock(port => 1);
my $sentinels = join ',', map { "127.0.0.1:$_->{port}" } @sentinel;

my @gw = map { Ratepool::Test->new } 1 .. 2;

for my $g (@gw) {
    $g->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis_sentinel=$sentinels redis_master=mymaster
                  redis_timeout=200ms;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-m rpm=100000;
        ratepool_key m1 org=org-m server=127.0.0.1:${\ $mock->port }
                     key=$KEY;
    }

    ratepool_workspace team rpm=100000;
    ratepool_client team ${\ $g->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF
    $g->run;
}

ok(Ratepool::Test::redis_connected(@gw),
   'both gateways found the master through the sentinels');

my $store = $gw[0]->status->{store};
is($store->{server}, '127.0.0.1:' . $master->port,
   'the status says where the master is');
is($store->{master}, 'mymaster', 'by the sentinels\' name for it');
is($store->{failovers}, 0, 'and that it has not moved');
like($gw[0]->error_log,
     qr/redis master "mymaster" is at 127\.0\.0\.1:\d+, as its sentinels say/,
     'the log says where it is');

# --- load on both gateways; the master dies -----------------------------------

my $load = $t->load_start(\@gw, $TOKEN, 9);

sleep 1.5;
my $killed = time;
kill KILL => $master->pid;

$deadline = time + 15;
sleep 0.2 while master_port() != $replica->port && time < $deadline;
is(master_port(), $replica->port, 'the sentinels promoted the replica');
my $promoted = time - $killed;

my ($all, $longest) = $t->load_end($load);
my @all = @$all;

my $failed = grep { $_ != 200 } @all;
ok(@all > 50, scalar(@all) . ' requests were sent during the failover');
is($failed, 0, 'none failed');
diag sprintf 'failover: promoted %.1f s after the master died; %d requests, '
    . '%d failed, the longest took %.3f s', $promoted, scalar @all, $failed,
    $longest // 0;

# the gateways follow the new master, without a reload
$deadline = time + 10;
sleep 0.2 while grep({ ($_->status->{store}{server} // '') ne
                       '127.0.0.1:' . $replica->port } @gw)
                && time < $deadline;

for my $g (@gw) {
    $store = $g->status->{store};
    is($store->{server}, '127.0.0.1:' . $replica->port,
       'a gateway uses the promoted master');
    is($store->{state}, 'up', 'and shares its limits there');
    is($store->{failovers}, 1, 'the failover is counted once');
    like($g->error_log,
         qr/\[warn\].*redis master "mymaster" moved from 127\.0\.0\.1:\d+ to 127\.0\.0\.1:${\ $replica->port }, as its sentinels say/,
         'and logged');
}

is($gw[0]->messages(token => $TOKEN)->{status}, 200, 'requests go on');
like($replica->cli('KEYS', '*'), qr/ratepool:\{llm\}:w:team/,
     'decided in the new master');

my $prom = $t->http(port => $gw[1]->port(0),
                    path => '/ratepool/status?format=prometheus')->{body};
like($prom, qr/^ratepool_redis_failovers_total 1$/m,
     'Prometheus counts the failover');

$_->check_log for @gw;

done_testing;
