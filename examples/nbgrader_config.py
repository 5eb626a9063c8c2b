# nbgrader configuration for the students' notebook containers (see docs/nbgrader.md).
#
# Put this file on the cluster (e.g. {scratch_dir}/nbgrader_config.py) and name it in the HPC
# config; `node-agent launch` binds it read-only to /etc/jupyter/nbgrader_config.py, one of the
# places Jupyter (and so nbgrader) reads configuration from:
#
#   [nbgrader]
#   exchange_dir = "{scratch_dir}/nbgrader-exchange"   # host directory, shared by the course
#   exchange_mount = "/srv/nbgrader/exchange"          # where it appears in every container
#   config_file = "{scratch_dir}/nbgrader_config.py"   # this file
#   config_mount = "/etc/jupyter/nbgrader_config.py"
#
# tests/test_nbgrader.py runs real nbgrader commands with exactly this file.

c = get_config()  # noqa: F821

# The exchange as seen INSIDE the container (= nbgrader.exchange_mount in the HPC config).
c.Exchange.root = "/srv/nbgrader/exchange"

# Fetch assignments into ~/<course>/<assignment>, so several courses can share one home.
c.Exchange.path_includes_course = True

# The student id. nbgrader names a submission after the *operating-system* user, unless that user
# is called "jovyan" (then it takes $JUPYTERHUB_USER). Apptainer runs the container as the job's
# cluster account, which is not "jovyan" - and may be one account shared by all students - so
# take the id from $JUPYTERHUB_USER, which the spawner sets in every job and `node-agent launch`
# passes into the container. (Instructors who run `nbgrader collect/autograde` in such a
# container override it with `c.CourseDirectory.student_id = "*"` in their
# ~/.jupyter/nbgrader_config.py, which Jupyter reads after /etc/jupyter.)
# nbgrader refuses ids containing '+' or '*'.
import os  # noqa: E402

if os.environ.get("JUPYTERHUB_USER"):
    c.CourseDirectory.student_id = os.environ["JUPYTERHUB_USER"]

# A course can be fixed here for a single-course hub; otherwise students pass --course or pick
# it in the Assignment List extension.
# c.CourseDirectory.course_id = "cs101"

# Timezone of submission timestamps (timestamp.txt). A named zone such as "Europe/Berlin" needs
# the zone database inside the image (/usr/share/zoneinfo or the tzdata Python package).
c.Exchange.timezone = "UTC"
