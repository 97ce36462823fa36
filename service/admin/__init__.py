"""The admin side: what each kind of job is (:mod:`~service.admin.kinds`), its typed plan
(:mod:`~service.admin.plans`), its acceptance (:mod:`~service.admin.acceptance`), the paths it may read
(:mod:`~service.admin.paths`), and the facade the routes call (:mod:`~service.admin.facade`). The runner that runs
jobs is :mod:`service.jobs`; the commit that swaps in what a job made is :meth:`service.state.Services.job_succeeded`.
"""
